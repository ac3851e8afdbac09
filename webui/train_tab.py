"""The Train tab: photos and prompts in, a run of the trainer out, its progress streamed from the run's files.

The page polls the status once a second, so a reloaded page or a second tab shows the run in progress. Scripts
do the same through the API (webui/api.py: train, train_status, train_stop, train_resume).
"""

from __future__ import annotations

import html
import re
from pathlib import Path

import gradio as gr
import pandas as pd

from dreambooth_moslora.adapter import LORA_INITS, MIXER_INITS, MIXER_MODES
from dreambooth_moslora.errors import RequestError
from dreambooth_moslora.training.model_card import VALIDATION_HEADING
from toyworld.recipe import TOY_SAMPLE_PROMPT

from .api import refused
from .presets import PRESETS
from .run_folder import RunStatus, format_seconds, preview
from .training import Trainer, TrainRequest

ADVANCED = ("rank", "lora_alpha", "mixer", "mixer_init", "lora_init", "learning_rate", "text_encoder_lr",
            "max_train_steps", "train_text_encoder", "seed", "validation_steps", "num_class_images", "alpha_mask")


def request_from(files, folder, captions, instance_prompt, class_prompt, prior, preset, base, sample_prompt,
                 *advanced) -> TrainRequest:
    """The page's fields as a TrainRequest; the manager checks every value."""
    table = captions.values.tolist() if isinstance(captions, pd.DataFrame) else (captions or [])
    edited = {str(row[0]): str(row[1]) for row in table
              if len(row) >= 2 and row[0] and isinstance(row[1], str)
              and row[1].strip()}
    return TrainRequest(
        images=[str(f) for f in (files or [])], folder=folder or None, captions=edited, instance_prompt=instance_prompt,
        class_prompt=class_prompt, prior_preservation=bool(prior), preset=preset, base_model=base or None,
        sample_prompt=sample_prompt or "", settings=dict(zip(ADVANCED, advanced)),
    )


def progress_html(s: RunStatus) -> str:
    """The bar and the line under it."""
    if s.state == "idle":
        return "<div id='train-state'>No run yet.</div>"
    share = s.step / s.max_steps if s.max_steps else 0.0
    parts = [f"<b>{html.escape(s.state)}</b>", html.escape(s.phase) if s.phase and s.phase != s.state else "",
             f"step {s.step} of {s.max_steps}"]
    if s.loss is not None:
        parts.append(f"loss {s.loss:.4f}")
    if s.steps_per_second:
        parts.append(f"{s.steps_per_second:.2f} steps/s")
    if s.seconds_left is not None:
        parts.append(f"{format_seconds(s.seconds_left)} left")
    bar = (f"<div style='background:#e5e7eb;border-radius:4px;height:14px'><div style='background:#f97316;height:14px;"
           f"border-radius:4px;width:{100 * share:.1f}%'></div></div>")
    return f"{bar}<div id='train-state'>{' · '.join(p for p in parts if p)} · run {html.escape(s.run_id or '')}</div>"


def model_card_text(run_dir: Path) -> str:
    """The model card beside an adapter, without its YAML header."""
    try:
        text = (run_dir / "README.md").read_text(encoding="utf-8")
    except OSError:
        return ""
    text = re.sub(r"\A---\n.*?\n---\n", "", text, flags=re.S)
    # its pictures are files the page does not serve (and it shows the samples itself): their section goes, and any
    # other
    text = re.sub(rf"\n{re.escape(VALIDATION_HEADING)}\n.*?(?=\n## |\Z)", "", text, flags=re.S)
    return re.sub(r"!\[[^\]]*\]\([^)]*\)", "", text).strip()


class TrainTab:
    """The Train tab: its components (made inside an open gr.Tabs) and the handlers of their events.
    ``generate_tab`` holds the Generate tab's adapters dropdown, prompt and adapter list ("choices"),
    which a finished run updates and "Generate with it" fills."""

    def __init__(self, trainer: Trainer, generate_tab: dict, tabs: gr.Tabs, demo: bool):
        self.trainer, self.generate_tab, self.tabs = trainer, generate_tab, tabs
        self.output_dir = trainer.engine.output_dir
        self.default_preset = trainer.default_preset
        with gr.Tab("Train", id="train") as self.tab, gr.Row():
            with gr.Column(scale=2):
                self._inputs(demo)
            with gr.Column(scale=3):
                self._outputs()
        self._wire()

    def _inputs(self, demo: bool) -> None:
        root = self.trainer.data_root
        folders = sorted(p.name for p in root.iterdir() if p.is_dir()) if root else []
        self.files = gr.File(label="Photos of the subject (3 to 30; a .txt of the same name is its caption)",
                             file_count="multiple", type="filepath", elem_id="train-files")
        self.folder = gr.Dropdown([("(the uploads)", ""), *folders], value="", label="…or a folder under the data root",
                                  visible=bool(folders))
        self.photos = gr.Gallery(label="Training images", columns=6, height=160, elem_id="train-images", format="png")
        self.captions = gr.Dataframe(headers=["image", "caption (empty: the instance prompt)"], datatype=["str", "str"],
                                     column_count=(2, "fixed"), interactive=True, label="Captions", elem_id="captions")
        self.instance_prompt = gr.Textbox(label="Instance prompt: the subject, with a rare token",
                                          placeholder="a photo of sks dog", value="a sks circle" if demo else "",
                                          elem_id="instance-prompt")
        self.class_prompt = gr.Textbox(label="Class prompt: the subject without its token",
                                       placeholder="a photo of dog", value="a circle" if demo else "",
                                       elem_id="class-prompt")
        self.prior = gr.Checkbox(True, label="Prior preservation (class images drawn by the base model, "
                                             "reused by later runs)")
        self.preset = gr.Dropdown(list(PRESETS), value=self.default_preset, label="Preset", elem_id="preset",
                                  info="the toy world's takes about a minute on two CPU cores")
        self.base = gr.Dropdown([("the preset's", ""), *self.trainer.engine.base_models()], value="",
                                label="Base model", elem_id="train-base")
        self.sample_prompt = gr.Textbox(TOY_SAMPLE_PROMPT if demo else "",
                                        label="Sample prompt (empty: the instance prompt)", elem_id="sample-prompt")
        self.advanced = advanced_panel(PRESETS[self.default_preset].options)
        self.plan = gr.Markdown(elem_id="plan")
        with gr.Row():
            self.start = gr.Button("Start", variant="primary", elem_id="train-start")
            self.stop = gr.Button("Stop (keeps a checkpoint)", elem_id="train-stop")
            self.resume = gr.Button("Resume", elem_id="train-resume")
        self.run_id = gr.Textbox(label="Run", interactive=False, elem_id="run-id")
        self.fields = [self.files, self.folder, self.captions, self.instance_prompt, self.class_prompt, self.prior,
                       self.preset, self.base, self.sample_prompt, *self.advanced]

    def _outputs(self) -> None:
        self.progress = gr.HTML(elem_id="train-progress")
        self.error = gr.Markdown(elem_id="train-error")
        self.loss_plot = gr.LinePlot(x="step", y="loss", title="Loss", height=220, elem_id="loss-plot")
        self.sample = gr.Image(label="Latest sample (the same seeds every time)", type="filepath", interactive=False,
                               height=220, elem_id="samples", format="png")
        self.class_images = gr.Gallery(label="Class images", columns=10, height=140, object_fit="contain",
                                       elem_id="class-images", format="png")
        self.use_it = gr.Button("Generate with it", visible=False, variant="primary", elem_id="use-adapter")
        self.card = gr.Markdown(elem_id="model-card")

    def _wire(self) -> None:
        with self.tab:  # what is not shown (state, timer, API endpoint) lives in the tab too
            shown = gr.State(None)
            timer = gr.Timer(1.0)
        internal = dict(api_visibility="private")  # the page's own events: the API is webui/api.py
        gr.on([self.files.change, self.folder.change], self.show_photos, inputs=[self.files, self.folder],
              outputs=[self.photos, self.captions, self.error], **internal)
        gr.on([f.change for f in self.fields if f is not self.captions] + [self.captions.input], self.describe,
              inputs=self.fields, outputs=self.plan, show_progress="hidden", **internal)
        self.preset.change(self.preset_values, inputs=self.preset, outputs=list(self.advanced), **internal)
        self.start.click(self.start_run, inputs=self.fields, outputs=self.run_id, concurrency_limit=1, **internal)
        self.stop.click(self.stop_run, outputs=self.run_id, **internal)
        self.resume.click(self.resume_run, inputs=self.run_id, outputs=self.run_id, **internal)
        outputs = [self.progress, self.error, self.loss_plot, self.sample, self.class_images, self.use_it, self.card,
                   self.run_id, self.generate_tab["adapters"], shown]
        timer.tick(self.refresh, inputs=shown, outputs=outputs, show_progress="hidden", **internal)
        self.use_it.click(self.use_adapter,
                          outputs=[self.tabs, self.generate_tab["adapters"], self.generate_tab["prompt"]], **internal)

    # ---- the buttons

    def start_run(self, *values) -> str:
        """Starts a run from the page's fields; returns its id."""
        try:
            return self.trainer.start(request_from(*values)).run_id
        except RequestError as exc:
            raise refused(exc) from None

    def stop_run(self) -> str:
        try:
            return self.trainer.stop().run_id
        except RequestError as exc:
            raise refused(exc) from None

    def resume_run(self, run: str) -> str:
        try:
            return self.trainer.resume(run).run_id
        except RequestError as exc:
            raise refused(exc) from None

    # ---- the page's own

    def show_photos(self, uploaded, chosen):
        """The gallery and caption table of the chosen images (or the reason they cannot be used)."""
        try:
            images = self.trainer.collect_images(TrainRequest(images=[str(f) for f in uploaded or []],
                                                              folder=chosen or None))
        except RequestError as exc:
            return [], [], f"**{exc}**"
        rows = [[Path(p).name, caption or ""] for p, caption, _ in images]
        shown = [(str(preview(p, self.output_dir, side=256)), caption or Path(p).name) for p, caption, _ in images]
        return shown, rows, ""

    def describe(self, *values) -> str:
        return self.trainer.plan(request_from(*values))

    def preset_values(self, name: str) -> list:
        options = PRESETS.get(name, PRESETS[self.default_preset]).options
        return [gr.update(value=options.get(key)) for key in ADVANCED]

    def refresh(self, shown):
        """Once a second: the current run's progress, changed parts only."""
        s = self.trainer.status()
        key = (s.run_id, s.state, s.phase, s.step, len(s.samples), len(s.class_images), s.error)
        if key == shown:  # nothing new: leave the page as it is
            return [gr.update()] * 9 + [shown]
        # typed columns even when empty: the plot keeps the axis types it is first given
        curve = pd.DataFrame({"step": pd.Series([step for step, _ in s.loss_curve], dtype="int64"),
                              "loss": pd.Series([loss for _, loss in s.loss_curve], dtype="float64")})
        sample = gr.update()
        if s.samples:
            path, step = s.samples[-1]
            when = f"at step {step}" if step else "after training"
            sample = gr.update(value=str(preview(path, self.output_dir)),
                               label=f"Sample {when} (the same seeds every time)")
        class_list = [(str(preview(p, self.output_dir, side=128)), "") for p in s.class_images[-20:]]
        done = s.state == "done" and s.adapter_id is not None
        adapters = gr.update(choices=self.generate_tab["choices"]()[0]) if done else gr.update()
        card = model_card_text(self.trainer.root / s.run_id) if done else ""
        return (progress_html(s), f"**{s.error}**" if s.error else "", curve, sample, class_list,
                gr.update(visible=done), card, s.run_id or "", adapters, key)

    def use_adapter(self):
        """To the Generate tab, with the finished run's adapter chosen and its prompt filled in."""
        s = self.trainer.status()
        if s.adapter_id is None:
            raise gr.Error("no finished run to generate with", print_exception=False)
        choices = self.generate_tab["choices"]()[0]
        try:
            prompt = self.trainer.engine.entry(s.adapter_id).suggested_prompt or s.instance_prompt
        except RequestError:  # the file went away since the run: the Generate tab will say so
            prompt = s.instance_prompt
        return gr.Tabs(selected="generate"), gr.update(choices=choices, value=[s.adapter_id]), prompt


def advanced_panel(options: dict) -> list:
    with gr.Accordion("Advanced", open=False):
        with gr.Row():
            rank = gr.Number(options["rank"], precision=0, label="Rank", elem_id="adv-rank")
            alpha = gr.Number(options["lora_alpha"], label="α (scale α/rank)")
            mixer = gr.Dropdown(list(MIXER_MODES), value=options["mixer"], label="Mixer (none: plain LoRA)")
            mixer_init = gr.Dropdown(list(MIXER_INITS), value=options["mixer_init"], label="Mixer init")
            lora_init = gr.Dropdown(list(LORA_INITS), value=options["lora_init"], label="A's init")
        with gr.Row():
            lr = gr.Number(options["learning_rate"], label="Learning rate")
            te_lr = gr.Number(options["text_encoder_lr"], label="Text-encoder learning rate")
            steps = gr.Number(options["max_train_steps"], precision=0, label="Steps", elem_id="adv-steps")
            te = gr.Checkbox(options["train_text_encoder"], label="Adapters on the text encoders")
        with gr.Row():
            seed = gr.Number(options["seed"], precision=0, label="Seed")
            every = gr.Number(options["validation_steps"], precision=0, label="Samples every N steps",
                              elem_id="adv-every")
            class_count = gr.Number(options["num_class_images"], precision=0, label="Class images",
                                    elem_id="adv-class-count")
            alpha_mask = gr.Checkbox(options["alpha_mask"],
                                     label="Masked loss: each photo's alpha channel (transparent: not learned)",
                                     elem_id="adv-alpha-mask")
    return [rank, alpha, mixer, mixer_init, lora_init, lr, te_lr, steps, te, seed, every, class_count, alpha_mask]
