"""The Gradio web demo: generate the trained subject from saved adapters.

    python -m webui --adapters ./outputs            # then open http://127.0.0.1:7860
    python -m webui --demo                          # offline: the toy world's model and the demo's adapters
"""
