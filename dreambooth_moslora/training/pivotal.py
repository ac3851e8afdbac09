"""Pivotal tuning in the trainer (--train_text_encoder_ti): new tokens for --token_abstraction, trained beside the
adapter for the first --train_text_encoder_ti_frac of the steps, then frozen; saved as
``<folder name>_emb.safetensors``.

The abstraction ("TOK") is replaced by its tokens ("<s0><s1>") in the instance prompt, the captions and the
validation prompt, as diffusers' advanced DreamBooth script does; the files record the rewritten prompts, which
are what a user types once the embeddings are loaded.
"""

from __future__ import annotations

from pathlib import Path

from ..embeddings import ENCODER_KEYS, NewTokens, TokenRows, install, read_embeddings, save_embeddings
from ..errors import TrainingError
from ..runtime import seeded_generator

EMBEDDING_DRAW = 7  # the place of the new rows' first draw in the seed scheme (runtime.seeded_generator)


class Pivotal:
    """The run's new tokens and their rows in both text encoders."""

    def __init__(self, new: NewTokens, modules: list[TokenRows]):
        self.new, self.modules = new, modules

    @classmethod
    def start(cls, args, base) -> Pivotal | None:
        """With --train_text_encoder_ti: the tokens installed (the base's tokenizers replaced by copies that know
        them) and the prompts in ``args`` rewritten; otherwise None."""
        if not args.train_text_encoder_ti:
            return None
        new = NewTokens.plan(args.token_abstraction, args.num_new_tokens_per_abstraction)
        if args.instance_prompt is not None and (missing := new.missing_from(args.instance_prompt)):
            raise TrainingError(f"--instance_prompt {args.instance_prompt!r} does not name {', '.join(missing)} "
                                "(--token_abstraction): pivotal tuning learns new tokens where it stands")
        base.tokenizers = install(base.tokenizers, base.text_encoders, new,
                                  generator=seeded_generator(args.seed, EMBEDDING_DRAW))
        args.instance_prompt = new.rewrite(args.instance_prompt) if args.instance_prompt is not None else None
        if args.validation_prompt:
            args.validation_prompt = new.rewrite(args.validation_prompt)
        args.validation_prompts = [new.rewrite(p) for p in args.validation_prompts]
        return cls(new, [encoder.get_input_embeddings() for encoder in base.text_encoders])

    @property
    def rows(self) -> list:
        return [module.rows for module in self.modules]

    def rewrite_captions(self, dataset) -> None:
        dataset.captions = [self.new.rewrite(caption) for caption in dataset.captions]

    def gate(self, lr_scheduler, group: int, stop_at: int) -> None:
        """The rows' learning rate drops to 0 after ``stop_at`` scheduler steps: AdamW then leaves them exactly as
        they are (nor does weight decay move them), and a resumed run stops them at the same step."""
        inner = lr_scheduler.lr_lambdas[group]

        def gated(step: int) -> float:  # a function, which the scheduler's state_dict leaves out (it is rebuilt)
            return inner(step) if step < stop_at else 0.0

        lr_scheduler.lr_lambdas[group] = gated

    def as_embeddings(self) -> tuple[dict, NewTokens]:
        """The rows by encoder key and their tokens, as adapter files bundle them."""
        return {key: module.rows.detach() for key, module in zip(ENCODER_KEYS, self.modules)}, self.new

    def save(self, path: Path) -> Path:
        return save_embeddings(path, *self.as_embeddings())

    def restore(self, path: Path) -> None:
        import torch

        rows, _ = read_embeddings(path)
        with torch.no_grad():
            for module, key in zip(self.modules, ENCODER_KEYS):
                module.rows.copy_(rows[key].to(module.rows.dtype))


def embeddings_file(output_dir: Path) -> Path:
    """Where a run's embeddings go: named after its folder, as diffusers' advanced script names them."""
    return Path(output_dir) / f"{Path(output_dir).resolve().name}_emb.safetensors"
