"""The toy world: a research kit beside the product, never imported by it.

    world       a deterministic world of captioned shapes; the DreamBooth subject (a purple circle)
    tiny_sdxl   SDXL-architecture models built offline: tiny and seeded, and the full-size layout
    pretrain    pretrains a small SDXL-architecture model on the world (assets/toy-sdxl)
    classifier  reads generated images back into shape, colour and background
    recipe      DreamBooth on the world: settings, class images, judgements (the demo's and the benchmark's)
    demo        the offline demo: ``python -m toyworld.demo``
"""
