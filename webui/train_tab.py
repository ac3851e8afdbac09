"""The Train tab: photos and prompts in, a run of the trainer out, its progress streamed from the run's files.

Every action is also an API endpoint: ``train`` (start; returns the run and adapter ids), ``train_status``,
``train_stop`` and ``train_resume``. The page polls the status once a second, so a reloaded page or a
second tab shows the run in progress.
"""

from __future__ import annotations

import html
import logging
import re
from pathlib import Path

import gradio as gr
import pandas as pd

from dreambooth_moslora.errors import RequestError

from .training import PRESETS, TOY_PRESET, RunStatus, Trainer, TrainRequest, format_seconds, preview

logger = logging.getLogger("webui")
ADVANCED = ("rank", "lora_alpha", "mixer", "mixer_init", "lora_init", "learning_rate", "text_encoder_lr", "max_train_steps",
            "train_text_encoder", "seed", "validation_steps", "num_class_images")  # fmt: skip


def refused(exc: Exception) -> gr.Error:
    return gr.Error(str(exc), print_exception=False)


def request_from(files, folder, captions, instance_prompt, class_prompt, prior, preset, base, sample_prompt, *advanced) -> TrainRequest:
    """The page's fields as a TrainRequest; the manager checks every value."""
    table = captions.values.tolist() if isinstance(captions, pd.DataFrame) else (captions or [])
    edited = {str(row[0]): str(row[1]) for row in table if len(row) >= 2 and row[0] and isinstance(row[1], str) and row[1].strip()}
    return TrainRequest(
        images=[str(f) for f in (files or [])], folder=folder or None, captions=edited, instance_prompt=instance_prompt,
        class_prompt=class_prompt, prior_preservation=bool(prior), preset=preset, base_model=base or None,
        sample_prompt=sample_prompt or "", settings=dict(zip(ADVANCED, advanced)),
    )  # fmt: skip


def progress_html(s: RunStatus) -> str:
    """The bar and the line under it."""
    if s.state == "idle":
        return "<div id='train-state'>No run yet.</div>"
    share = s.step / s.max_steps if s.max_steps else 0.0
    parts = [f"<b>{html.escape(s.state)}</b>", html.escape(s.phase) if s.phase and s.phase != s.state else "",
             f"step {s.step} of {s.max_steps}"]  # fmt: skip
    if s.loss is not None:
        parts.append(f"loss {s.loss:.4f}")
    if s.steps_per_second:
        parts.append(f"{s.steps_per_second:.2f} steps/s")
    if s.seconds_left is not None:
        parts.append(f"{format_seconds(s.seconds_left)} left")
    bar = (f"<div style='background:#e5e7eb;border-radius:4px;height:14px'><div style='background:#f97316;height:14px;"
           f"border-radius:4px;width:{100 * share:.1f}%'></div></div>")  # fmt: skip
    return f"{bar}<div id='train-state'>{' · '.join(p for p in parts if p)} · run {html.escape(s.run_id or '')}</div>"


def model_card_text(run_dir: Path) -> str:
    """The model card beside an adapter, without its YAML header."""
    try:
        text = (run_dir / "README.md").read_text(encoding="utf-8")
    except OSError:
        return ""
    text = re.sub(r"\A---\n.*?\n---\n", "", text, flags=re.S)
    return re.sub(r"!\[[^\]]*\]\([^)]*\)", "", text).strip()  # its pictures are files the page does not serve


def build_train_tab(trainer: Trainer, generate_tab: dict, tabs: gr.Tabs, demo: bool) -> None:
    """The Train tab's components and events (inside an open gr.Tabs); ``generate_tab`` has the Generate tab's
    adapters dropdown and prompt, which "Generate with it" fills."""
    output_dir = trainer.engine.output_dir
    default_preset = TOY_PRESET if demo else next(p for p in PRESETS if p != TOY_PRESET)
    folders = sorted(p.name for p in trainer.data_root.iterdir() if p.is_dir()) if trainer.data_root else []
    with gr.Tab("Train", id="train") as tab:
        with gr.Row():
            with gr.Column(scale=2):
                files = gr.File(label=f"Photos of the subject (3 to 30; a .txt of the same name is its caption)",
                                file_count="multiple", type="filepath", elem_id="train-files")  # fmt: skip
                folder = gr.Dropdown([("(the uploads)", ""), *folders], value="", label="…or a folder under the data root",
                                     visible=bool(folders))  # fmt: skip
                photos = gr.Gallery(label="Training images", columns=6, height=160, elem_id="train-images", format="png")
                captions = gr.Dataframe(headers=["image", "caption (empty: the instance prompt)"], datatype=["str", "str"],
                                        column_count=(2, "fixed"), interactive=True, label="Captions", elem_id="captions")  # fmt: skip
                instance_prompt = gr.Textbox(label="Instance prompt: the subject, with a rare token", placeholder="a photo of sks dog",
                                             value="a sks circle" if demo else "", elem_id="instance-prompt")  # fmt: skip
                class_prompt = gr.Textbox(label="Class prompt: the subject without its token", placeholder="a photo of dog",
                                          value="a circle" if demo else "", elem_id="class-prompt")  # fmt: skip
                prior = gr.Checkbox(True, label="Prior preservation (class images drawn by the base model, reused by later runs)")
                with gr.Row():
                    preset = gr.Dropdown(list(PRESETS), value=default_preset, label="Preset", elem_id="preset")
                    base = gr.Dropdown([("the preset's", ""), *trainer.engine.base_models()], value="", label="Base model",
                                       elem_id="train-base")  # fmt: skip
                sample_prompt = gr.Textbox("", label="Sample prompt (empty: the instance prompt)", elem_id="sample-prompt")
                advanced = advanced_panel(PRESETS[default_preset].options)
                plan = gr.Markdown(elem_id="plan")
                with gr.Row():
                    start = gr.Button("Start", variant="primary", elem_id="train-start")
                    stop = gr.Button("Stop (keeps a checkpoint)", elem_id="train-stop")
                    resume = gr.Button("Resume", elem_id="train-resume")
                run_id = gr.Textbox(label="Run", interactive=False, elem_id="run-id")
                started = gr.JSON(label="Started", visible=False)
            with gr.Column(scale=3):
                progress = gr.HTML(elem_id="train-progress")
                error = gr.Markdown(elem_id="train-error")
                loss_plot = gr.LinePlot(x="step", y="loss", title="Loss", height=220, elem_id="loss-plot")
                samples = gr.Image(label="Latest sample (the same seeds every time)", type="filepath", interactive=False,
                                   height=220, elem_id="samples", format="png")  # fmt: skip
                class_images = gr.Gallery(label="Class images", columns=10, height=140, object_fit="contain",
                                          elem_id="class-images", format="png")  # fmt: skip
                use_it = gr.Button("Generate with it", visible=False, variant="primary", elem_id="use-adapter")
                card = gr.Markdown(elem_id="model-card")
    fields = [files, folder, captions, instance_prompt, class_prompt, prior, preset, base, sample_prompt, *advanced]

    def show_photos(uploaded, chosen):
        try:
            images = trainer.collect_images(TrainRequest(images=[str(f) for f in uploaded or []], folder=chosen or None,
                                                         instance_prompt="x", class_prompt="y"))  # fmt: skip
        except RequestError as exc:
            return [], [], f"**{exc}**"
        rows = [[Path(p).name, caption or ""] for p, caption, _ in images]
        shown = [(str(preview(p, output_dir, side=256)), caption or Path(p).name) for p, caption, _ in images]
        return shown, rows, ""

    def describe(*values):
        return trainer.plan(request_from(*values))

    def preset_values(name):
        options = PRESETS.get(name, PRESETS[default_preset]).options
        return [gr.update(value=options.get(key)) for key in ADVANCED]

    def start_run(images, folder, captions, instance_prompt, class_prompt, prior_preservation, preset, base_model, sample_prompt,
                  rank, lora_alpha, mixer, mixer_init, lora_init, learning_rate, text_encoder_lr, max_train_steps,
                  train_text_encoder, seed, validation_steps, num_class_images):  # fmt: skip
        """Starts a run (named parameters: what the API documents); returns its id and its adapter's id."""
        values = (images, folder, captions, instance_prompt, class_prompt, prior_preservation, preset, base_model, sample_prompt,
                  rank, lora_alpha, mixer, mixer_init, lora_init, learning_rate, text_encoder_lr, max_train_steps,
                  train_text_encoder, seed, validation_steps, num_class_images)  # fmt: skip
        try:
            status = trainer.start(request_from(*values))
        except RequestError as exc:
            raise refused(exc) from None
        return {"run_id": status.run_id, "adapter_id": f"{status.run_id}/moslora_adapter.safetensors"}, status.run_id

    def stop_run():
        try:
            return trainer.stop().run_id
        except RequestError as exc:
            raise refused(exc) from None

    def resume_run(run):
        try:
            return trainer.resume(run).run_id
        except RequestError as exc:
            raise refused(exc) from None

    def train_status(run: str = "") -> dict:
        """The state of a run (the current or latest one when no id is given): step, loss, speed, samples, errors."""
        try:
            return trainer.status(run or None).as_dict()
        except RequestError as exc:
            raise refused(exc) from None

    def refresh(shown):
        s = trainer.status()
        key = (s.run_id, s.state, s.phase, s.step, len(s.samples), len(s.class_images), s.error)
        if key == shown:  # nothing new: leave the page as it is
            return [gr.update()] * 9 + [shown]
        # typed columns even when empty: the plot keeps the axis types it is first given
        curve = pd.DataFrame({"step": pd.Series([step for step, _ in s.loss_curve], dtype="int64"),
                              "loss": pd.Series([loss for _, loss in s.loss_curve], dtype="float64")})  # fmt: skip
        sample = gr.update()
        if s.samples:
            path, step = s.samples[-1]
            sample = gr.update(value=str(preview(path, output_dir)), label=f"Sample {f'at step {step}' if step else 'after training'} "
                               "(the same seeds every time)")  # fmt: skip
        class_list = [(str(preview(p, output_dir, side=128)), "") for p in s.class_images[-20:]]
        done = s.state == "done" and s.adapter_id is not None
        adapters_update = gr.update(choices=generate_tab["choices"]()[0]) if done else gr.update()
        message = f"**{s.error}**" if s.error else ""
        return (progress_html(s), message, curve, sample, class_list, gr.update(visible=done),
                model_card_text(trainer.root / s.run_id) if done else "", s.run_id or "", adapters_update, key)  # fmt: skip

    def use_adapter():
        s = trainer.status()
        if s.adapter_id is None:
            raise gr.Error("no finished run to generate with", print_exception=False)
        choices = generate_tab["choices"]()[0]
        return gr.Tabs(selected="generate"), gr.update(choices=choices, value=[s.adapter_id]), s.instance_prompt

    with tab:  # what is not shown (state, timer, API endpoint) lives in the tab too
        shown = gr.State(None)
        timer = gr.Timer(1.0)
        gr.api(train_status, api_name="train_status")
    internal = dict(api_visibility="undocumented")  # the page's own helpers, not part of the documented API
    gr.on([files.change, folder.change], show_photos, inputs=[files, folder], outputs=[photos, captions, error], **internal)
    gr.on([f.change for f in fields if f is not captions] + [captions.input], describe, inputs=fields, outputs=plan,
          show_progress="hidden", **internal)  # fmt: skip
    preset.change(preset_values, inputs=preset, outputs=list(advanced), **internal)
    start.click(start_run, inputs=fields, outputs=[started, run_id], api_name="train", concurrency_limit=1)
    stop.click(stop_run, outputs=run_id, api_name="train_stop")
    resume.click(resume_run, inputs=run_id, outputs=run_id, api_name="train_resume")
    outputs = [progress, error, loss_plot, samples, class_images, use_it, card, run_id, generate_tab["adapters"], shown]
    timer.tick(refresh, inputs=shown, outputs=outputs, show_progress="hidden", **internal)
    use_it.click(use_adapter, outputs=[tabs, generate_tab["adapters"], generate_tab["prompt"]], **internal)


def advanced_panel(options: dict) -> list:
    with gr.Accordion("Advanced", open=False):
        with gr.Row():
            rank = gr.Number(options["rank"], precision=0, label="Rank", elem_id="adv-rank")
            alpha = gr.Number(options["lora_alpha"], label="α (scale α/rank)")
            mixer = gr.Dropdown(["learned", "frozen", "none"], value=options["mixer"], label="Mixer (none: plain LoRA)")
            mixer_init = gr.Dropdown(["kaiming", "orthogonal", "identity"], value=options["mixer_init"], label="Mixer init")
            lora_init = gr.Dropdown(["gaussian", "kaiming"], value=options["lora_init"], label="A's init")
        with gr.Row():
            lr = gr.Number(options["learning_rate"], label="Learning rate")
            te_lr = gr.Number(options["text_encoder_lr"], label="Text-encoder learning rate")
            steps = gr.Number(options["max_train_steps"], precision=0, label="Steps", elem_id="adv-steps")
            te = gr.Checkbox(options["train_text_encoder"], label="Adapters on the text encoders")
        with gr.Row():
            seed = gr.Number(options["seed"], precision=0, label="Seed")
            every = gr.Number(options["validation_steps"], precision=0, label="Samples every N steps", elem_id="adv-every")
            class_count = gr.Number(options["num_class_images"], precision=0, label="Class images", elem_id="adv-class-count")
    return [rank, alpha, mixer, mixer_init, lora_init, lr, te_lr, steps, te, seed, every, class_count]
