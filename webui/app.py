"""The page: pick a base model and adapters, write a prompt, compare base and adapters side by side."""

from __future__ import annotations

import html

import gradio as gr

from dreambooth_moslora.formats import LOADED_BY

from .api import PIPELINE, Api, generate
from .engine import MAX_IMAGES, MAX_SIDE, MIN_SIDE, SCHEDULERS, Engine, Request, RequestError
from .train_tab import TrainTab, model_card_text
from .training import Trainer

# Long code in model cards wraps instead of running off the box; small images are enlarged with sharp pixels.
CSS = """
#card pre, #model-card pre { white-space: pre-wrap; overflow-wrap: anywhere; }
#gallery img, #samples img, #train-images img, #class-images img { image-rendering: pixelated; }
"""
PRIVATE = dict(api_visibility="private")  # the page's own events: not part of the API (webui/api.py is)


class GenerateTab:
    """The Generate tab: its components (made inside an open gr.Tabs) and the handlers of their events."""

    def __init__(self, engine: Engine, default_size: int):
        self.engine = engine
        with gr.Tab("Generate", id="generate"), gr.Row():
            with gr.Column(scale=2):
                self._inputs(default_size)
            with gr.Column(scale=3):
                self.gallery = gr.Gallery(label="Results", columns=4, height="auto", elem_id="gallery", format="png")
                self.status = gr.Markdown("", elem_id="status")
                with gr.Accordion("Model card", open=False):
                    self.card = gr.Markdown("", elem_id="card")

    def _inputs(self, default_size: int) -> None:
        usable, note = self.choices()
        self.adapters = gr.Dropdown(usable, multiselect=True, label="Adapters", elem_id="adapters",
                                    info="files under the adapters folder; several for compare mode")
        with gr.Row():
            self.refresh_button = gr.Button("Refresh list", size="sm")
            self.compare = gr.Checkbox(label="Compare: base model beside each adapter", value=False, elem_id="compare")
        self.unreadable = gr.Markdown(note)
        self.details = gr.Markdown("", elem_id="details")
        self.download = gr.File(label="Download the selected files", file_count="multiple", visible=False,
                                interactive=False)
        self.base = gr.Textbox(label="Base model", placeholder="empty: the server's choice", info=self.base_hint(),
                               elem_id="base")
        self.prompt = gr.Textbox(label="Prompt", lines=2, elem_id="prompt")
        self.negative = gr.Textbox(label="Negative prompt", lines=1)
        with gr.Row():
            self.steps = gr.Slider(1, 150, value=25, step=1, label="Steps")
            self.guidance = gr.Slider(0, 30, value=5.0, step=0.5, label="Guidance")
        with gr.Row():
            self.seed = gr.Number(value=0, precision=0, label="Seed")
            self.randomize = gr.Checkbox(value=True, label="Random seed")
        with gr.Row():
            self.width = gr.Slider(MIN_SIDE, MAX_SIDE, value=default_size, step=8, label="Width")
            self.height = gr.Slider(MIN_SIDE, MAX_SIDE, value=default_size, step=8, label="Height")
        with gr.Row():
            self.count = gr.Slider(1, MAX_IMAGES, value=1, step=1, label="Images")
            self.scheduler = gr.Dropdown(list(SCHEDULERS), value="Euler", label="Scheduler")
        self.scale = gr.Slider(0, 1.5, value=1.0, step=0.05, label="Adapter scale", elem_id="scale")
        self.run = gr.Button("Generate", variant="primary", elem_id="generate")

    def wire(self) -> None:
        self.refresh_button.click(self.refresh, outputs=[self.adapters, self.unreadable], **PRIVATE)
        self.adapters.focus(self.refresh, outputs=[self.adapters, self.unreadable], show_progress="hidden", **PRIVATE)
        self.adapters.change(self.on_select, inputs=self.adapters,
                             outputs=[self.prompt, self.details, self.base, self.download,
                             self.card], **PRIVATE)
        self.run.click(
            self.on_generate,
            inputs=[self.base, self.adapters, self.prompt, self.negative, self.steps, self.guidance, self.seed,
                    self.randomize, self.width, self.height, self.count, self.scheduler, self.scale, self.compare],
            outputs=[self.gallery, self.status, self.seed],
            show_progress_on=[self.gallery],  # not over the seed field too, which only gets the seed used
            concurrency_id=PIPELINE, concurrency_limit=1,  # one pipeline: requests (the API's too) wait their turn
            **PRIVATE,
        )

    def choices(self) -> tuple[list, str]:
        """The readable adapters as (label, id), and a note naming the unreadable files."""
        entries = self.engine.adapters()
        usable = [(e.label, e.id) for e in entries if not e.error]
        broken = [f"- `{e.id}`: {e.error}" for e in entries if e.error]
        note = ("**Unreadable files in the folder:**\n" + "\n".join(broken)) if broken else ""
        return usable, note

    def refresh(self):
        usable, note = self.choices()
        return gr.update(choices=usable), note

    def on_select(self, selected):
        """Pre-fills the prompt with the first adapter's sample or instance prompt, and shows what is known of each."""
        if not selected:
            return gr.update(), "", gr.update(), gr.update(value=None, visible=False), ""
        lines, prompt, base, downloads, cards = [], None, None, [], []
        for adapter_id in selected:
            try:
                entry = self.engine.entry(adapter_id)
            except RequestError as exc:
                lines.append(f"- `{adapter_id}`: {exc}")
                continue
            i = entry.info
            prompt = prompt or entry.suggested_prompt
            base = base or i.get("base_model")
            # escaped: pivotal tuning's "<s0><s1>" would otherwise be taken for HTML tags and vanish from the page
            trained = f"“{html.escape(i['instance_prompt'])}”, " if i.get("instance_prompt") else ""
            steps = f", {i['steps']} steps" if i.get("steps") else ""
            lines.append(f"- `{entry.id}`: {trained}rank {i.get('rank')}, α {i.get('alpha')}, "
                         f"mixer {i.get('mixer')}{steps}; "
                         f"{entry.format} file, loads in {LOADED_BY[entry.format]}")
            downloads.append(str(self.engine.download_copy(entry)))
            if card := model_card_text(entry.path.parent):  # the trainer's README.md beside the file
                cards.append(f"#### Model card of `{entry.path.parent.name}`\n\n{card}")
        details = "**Selected:**\n" + "\n".join(lines)
        files = gr.update(value=downloads or None, visible=bool(downloads))
        prompt_update = gr.update(value=prompt) if prompt else gr.update()
        return prompt_update, details, gr.update(info=self.base_hint(base)), files, "\n\n".join(cards)

    def base_hint(self, recorded=None) -> str:
        offered = ", ".join(self.engine.base_models()) or "the server's default"
        return f"the server's choice: {offered}" + (f"; the adapter records {recorded}" if recorded else "")

    def on_generate(self, base, selected, prompt, negative, steps, guidance, seed, randomize, width, height, count,
                    scheduler, scale,
                 compare, progress=gr.Progress()):
        # Values go to the engine as the client sent them: it checks and converts every one.
        request = Request(
            prompt=prompt, negative_prompt=negative or "",
                          adapters=list(selected or []) if isinstance(selected, list) else selected,
            compare=bool(compare), base_model=base or None, steps=steps, guidance=guidance,
                          seed=-1 if randomize else seed,
            width=width, height=height, num_images=count, scheduler=scheduler, scale=scale,
        )
        results = generate(self.engine, request, progress=progress)
        seeds = sorted({r.parameters["seed"] for r in results})
        status = (f"{len(results)} image(s) from {results[0].parameters['base_model']}, "
                  f"seed(s) {', '.join(map(str, seeds))}")
        for warning in dict.fromkeys(r.parameters["warning"] for r in results if r.parameters.get("warning")):
            gr.Warning(warning)  # a toast on the page; the status line keeps it
            status += f"\nwarning: {warning}"
        return [(str(r.path), r.label) for r in results], status, seeds[0]


def build(engine: Engine, default_size: int = 1024, trainer: Trainer | None = None, demo: bool = False) -> gr.Blocks:
    """The page: a Generate tab, and a Train tab when a trainer is given."""
    with gr.Blocks(title="dreambooth-moslora") as page:
        gr.Markdown("# dreambooth-moslora\nTrain MoSLoRA adapters on your subject, and generate it from them.")
        with gr.Tabs(selected="generate") as tabs:
            generate_tab = GenerateTab(engine, default_size)
            if trainer is not None:
                TrainTab(trainer,
                         {"adapters": generate_tab.adapters, "prompt": generate_tab.prompt,
                          "choices": generate_tab.choices}, tabs, demo)
        generate_tab.wire()
        Api(engine, trainer, default_size).register()
    return page
