"""Datasets as kohya users bring them: N_prompt folders and dataset TOMLs train alike, repeats set the epoch, bad
files are one line, captions vary reproducibly, and the files carry sd-scripts' dataset metadata."""

import json
import random
import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dreambooth_moslora.safe_files import read_safetensors, save_image
from dreambooth_moslora.training import main, parse_args
from dreambooth_moslora.training.data import CaptionRules, DreamBoothDataset
from dreambooth_moslora.training.dataset_config import gather
from dreambooth_moslora.training.loop import read_loss_log
from toyworld.world import render, sample_scene

COMMON = ("--resolution", "64", "--train_batch_size", "2", "--seed", "0", "--report_to", "none", "--learning_rate",
          "1e-3", "--output_formats", "native", "kohya")


@pytest.fixture(scope="module")
def kohya(world, tmp_path_factory):
    """kohya's layout: train/10_sks circle (the subject, with .txt captions), reg/1_circle (other circles, no
    captions: the folder's prompt)."""
    root = tmp_path_factory.mktemp("kohya")
    subject = root / "train" / "10_sks circle"
    shutil.copytree(world["subject"], subject)
    reg = root / "reg" / "1_circle"
    reg.mkdir(parents=True)
    rng = random.Random(3)
    for i in range(3):
        save_image(render(sample_scene(rng, shape="circle"), 64), reg / f"circle_{i}.png")
    return root


def toml(path, text: str):
    path.write_text(text)
    return path


def same_data_as_toml(kohya, path):
    return toml(path, f"""[general]
caption_extension = ".txt"

[[datasets]]
resolution = 64
batch_size = 2

  [[datasets.subsets]]
  image_dir = "{kohya / 'train' / '10_sks circle'}"
  num_repeats = 10
  class_tokens = "sks circle"

  [[datasets.subsets]]
  image_dir = "{kohya / 'reg' / '1_circle'}"
  is_reg = true
  class_tokens = "circle"
""")


def run(world, out, *extra, steps=3):
    return main(["--pretrained_model_name_or_path", str(world["model"]), "--output_dir", str(out), "--max_train_steps",
                 str(steps), *COMMON, *extra])


def test_a_kohya_tree_and_the_same_data_as_a_toml_train_the_same_adapter(world, kohya, tmp_path):
    assert run(world, tmp_path / "folders", "--train_data_dir", str(kohya / "train"), "--reg_data_dir",
               str(kohya / "reg"), "--caption_extension", ".txt") == 0
    config = same_data_as_toml(kohya, tmp_path / "data.toml")
    assert main(["--pretrained_model_name_or_path", str(world["model"]), "--output_dir", str(tmp_path / "toml"),
                 "--max_train_steps", "3", "--seed", "0", "--report_to", "none", "--learning_rate", "1e-3",
                 "--output_formats", "native", "kohya", "--dataset_config", str(config)]) == 0
    a, b = (load_file(tmp_path / run_ / "moslora_adapter.safetensors") for run_ in ("folders", "toml"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert max(t.abs().max().item() for k, t in a.items() if k.endswith("moslora_B")) > 0  # it trained
    _, metadata = read_safetensors(tmp_path / "folders" / "pytorch_lora_weights_kohya.safetensors")
    assert json.loads(metadata["ss_dataset_dirs"]) == {"10_sks circle": {"n_repeats": 10, "img_count": 5},
                                                       "1_circle": {"n_repeats": 1, "img_count": 3}}
    assert metadata["ss_num_train_images"] == "50" and metadata["ss_num_reg_images"] == "3"
    tags = json.loads(metadata["ss_tag_frequency"])
    assert tags["1_circle"] == {"circle": 3} and sum(tags["10_sks circle"].values()) == 5  # one caption per image
    assert (metadata["ss_caption_dropout_rate"], metadata["ss_shuffle_caption"], metadata["ss_keep_tokens"]) == (
        "0.0", "False", "0")
    assert metadata["ss_instance_prompt"] == "sks circle"


def epoch_steps(out) -> int:
    return len(read_loss_log(out / "loss.csv"))


def test_repeats_set_the_epoch_length_as_kohyas_do(world, kohya, tmp_path):
    args = parse_args(["--pretrained_model_name_or_path", "m", "--train_data_dir", str(kohya / "train"),
                       "--reg_data_dir", str(kohya / "reg"), "--output_dir", str(tmp_path / "x")])
    instance, classes = gather(args.subsets, warn=False), gather(args.reg_subsets, warn=False)
    assert len(instance.paths) == 50 and len(classes.paths) == 3 and args.with_prior_preservation
    dataset = DreamBoothDataset(instance.paths, None, 64, classes.paths, captions=instance.captions,
                                class_captions=classes.captions, length=len(instance.paths))
    assert len(dataset) == 50  # kohya: the instance images × repeats; each paired with a class image
    assert instance.captions[0].startswith("a sks circle on a")  # its .txt (kohya_ss's extension) over the folder name
    assert classes.captions == ["circle"] * 3  # no caption file: the folder's prompt
    # the plain folder with diffusers' --repeats: 5 images × 3 = 15 a epoch, 8 steps of 2 (the last one short)
    plain = ("--instance_data_dir", str(world["subject"]), "--instance_prompt", "a sks circle", "--num_train_epochs",
             "1")
    assert main(["--pretrained_model_name_or_path", str(world["model"]), "--output_dir", str(tmp_path / "r3"),
                 *COMMON, *plain, "--repeats", "3"]) == 0
    assert main(["--pretrained_model_name_or_path", str(world["model"]), "--output_dir", str(tmp_path / "r1"),
                 *COMMON, *plain]) == 0
    assert (epoch_steps(tmp_path / "r3"), epoch_steps(tmp_path / "r1")) == (8, 3)


BAD = {
    "unknown key": ("[[datasets]]\n  [[datasets.subsets]]\n  image_dir = '{img}'\n  num_repeat = 3\n",
                    "data.toml:4: unknown key 'num_repeat' in [datasets.subsets]"),
    "wrong type": ("[[datasets]]\n  [[datasets.subsets]]\n  image_dir = '{img}'\n  num_repeats = 'ten'\n",
                   "data.toml:4: num_repeats must be a whole number, got 'ten'"),
    "missing folder": ("[[datasets]]\n  [[datasets.subsets]]\n  image_dir = '{img}/nowhere'\n",
                       "data.toml:3: image_dir '{img}/nowhere' does not exist or is not a folder"),
    "no subsets": ("[[datasets]]\nbatch_size = 2\n", "data.toml:1: [[datasets]] has no [[datasets.subsets]]"),
    "two datasets": ("[[datasets]]\n[[datasets]]\n", "data.toml:2: needs exactly one [[datasets]] table"),
    "unsupported": ("[[datasets]]\n  [[datasets.subsets]]\n  image_dir = '{img}'\n  random_crop = true\n",
                    "data.toml:4: random_crop is not supported by this trainer"),
    "colour augmentation": ("[general]\ncolor_aug = true\n[[datasets]]\n  [[datasets.subsets]]\n"
                            "  image_dir = '{img}'\n",
                            "data.toml:2: color_aug is not supported"),
    "dataset key in a subset": ("[[datasets]]\n  [[datasets.subsets]]\n  image_dir = '{img}'\n  batch_size = 2\n",
                                "data.toml:4: batch_size belongs in [[datasets]] or [general], not in a subset"),
    "bad dropout": ("[[datasets]]\n  [[datasets.subsets]]\n  image_dir = '{img}'\n  caption_dropout_rate = 1.5\n",
                    "data.toml:4: caption_dropout_rate must be between 0 and 1, got 1.5"),
    "syntax": ("[[datasets]\n", "data.toml: "),
    "given twice": ("[[datasets]]\nbatch_size = 2\n  [[datasets.subsets]]\n  image_dir = '{img}'\n",
                    "data.toml:2: batch_size is set here and by --train_batch_size: give it once"),
}


@pytest.mark.parametrize("case", BAD)
def test_each_bad_dataset_config_is_one_line_before_any_model_loads(world, tmp_path, capsys, case):
    text, message = BAD[case]
    config = toml(tmp_path / "data.toml", text.format(img=world["subject"]))
    extra = ["--train_batch_size", "4"] if case == "given twice" else []
    with pytest.raises(SystemExit) as exit_:
        main(["--pretrained_model_name_or_path", "no/such-model", "--output_dir", str(tmp_path / "out"),
              "--dataset_config", str(config), *extra])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message.format(img=world["subject"]) in err[-1] and "Traceback" not in "\n".join(err), err[-1]


@pytest.mark.parametrize("extra, message", [
    (("--instance_data_dir", "{subject}", "--train_data_dir", "{subject}"), "give one of --instance_data_dir"),
    (("--train_data_dir", "{train}", "--instance_prompt", "a sks circle"), "--instance_prompt goes with"),
    (("--train_data_dir", "{subject}"), "has no <repeats>_<prompt> folder (e.g. 10_sks dog)"),
    (("--train_data_dir", "{train}", "--reg_data_dir", "{reg}", "--class_prompt", "a circle"),
     "the class images come from the regularisation folders"),
    (("--train_data_dir", "{train}", "--sample_prompts", "{train}/none.txt"), "none.txt: cannot be read"),
    (("--train_data_dir", "{train}", "--sample_prompts", "{subject}/sks_circle_0.txt", "--validation_prompt", "a"),
     "--sample_prompts and --validation_prompt both give validation prompts"),
])
def test_clashing_data_options_are_one_line(world, kohya, tmp_path, capsys, extra, message):
    names = {"subject": world["subject"], "train": kohya / "train", "reg": kohya / "reg"}
    with pytest.raises(SystemExit):
        parse_args(["--pretrained_model_name_or_path", "m", "--output_dir", str(tmp_path),
                    *(e.format(**names) for e in extra)])
    assert message in capsys.readouterr().err.strip().splitlines()[-1]


def test_caption_rules_keep_the_first_tags_and_drop_at_their_rate():
    caption = "sks dog, red collar, on grass, sunny, close-up"
    shuffle = CaptionRules(shuffle=True, keep_tokens=1)
    draws = [shuffle.apply(caption, torch.Generator().manual_seed(i)) for i in range(50)]
    assert all(d.startswith("sks dog, ") and sorted(d.split(", ")) == sorted(caption.split(", ")) for d in draws)
    assert len(set(draws)) > 10  # shuffled, not fixed
    dropout = CaptionRules(dropout_rate=0.3)
    dropped = sum(dropout.apply(caption, torch.Generator().manual_seed(i)) == "" for i in range(1000))
    assert 240 < dropped < 360 and not CaptionRules().varies


def test_varied_captions_are_the_same_in_a_resumed_run(world, tmp_path):
    # tags in the captions to shuffle; a resumed run must draw what the uninterrupted one drew
    data = tmp_path / "data" / "2_sks circle"
    shutil.copytree(world["subject"], data)
    for i, caption in enumerate(sorted(data.glob("*.txt"))):
        caption.write_text(f"sks circle, tag{i}, purple, round, small\n")
    varied = ("--train_data_dir", str(tmp_path / "data"), "--shuffle_caption", "--keep_tokens", "1",
              "--caption_dropout_rate", "0.25", "--checkpointing_steps", "2", "--cache_latents")
    out = tmp_path / "run"
    assert run(world, out, *varied, steps=4) == 0
    finished = load_file(out / "moslora_adapter.safetensors")
    (out / "moslora_adapter.safetensors").unlink()
    assert run(world, out, *varied, "--resume_from_checkpoint", str(out / "checkpoint-2"), steps=4) == 0
    again = load_file(out / "moslora_adapter.safetensors")
    assert all(torch.equal(finished[k], again[k]) for k in finished)
    plain = tmp_path / "plain"
    assert run(world, plain, *varied[:2], "--checkpointing_steps", "2", "--cache_latents", steps=4) == 0
    other = load_file(plain / "moslora_adapter.safetensors")
    assert any(not torch.equal(finished[k], other[k]) for k in finished)  # the captions did vary
    _, metadata = read_safetensors(out / "pytorch_lora_weights_kohya.safetensors")
    assert (metadata["ss_caption_dropout_rate"], metadata["ss_shuffle_caption"], metadata["ss_keep_tokens"]) == (
        "0.25", "True", "1")


def test_two_subjects_train_one_adapter_with_a_token_each(world, kohya, tmp_path):
    from dreambooth_moslora.embeddings import read_embeddings

    second = kohya / "train" / "4_zqx square"
    second.mkdir(exist_ok=True)
    rng = random.Random(5)
    for i in range(2):
        save_image(render(sample_scene(rng, shape="square"), 64), second / f"square_{i}.png")
    out = tmp_path / "run"
    prompts = toml(tmp_path / "prompts.txt", "# one row of samples each\na sks circle on a gray background\n\n"
                                             "a zqx square --n blurry --w 512\n")
    try:
        assert run(world, out, "--train_data_dir", str(kohya / "train"), "--reg_data_dir", str(kohya / "reg"),
                   "--train_text_encoder_ti", "--token_abstraction", "sks,zqx", "--text_encoder_lr", "1e-2",
                   "--sample_prompts", str(prompts), "--num_validation_images", "2") == 0
    finally:
        shutil.rmtree(second)  # the module's tree as the other tests know it
    _, new = read_embeddings(out / "run_emb.safetensors")
    assert new.abstractions == {"sks": ("<s0>", "<s1>"), "zqx": ("<s2>", "<s3>")}
    _, metadata = read_safetensors(out / "pytorch_lora_weights_kohya.safetensors")
    assert metadata["ss_num_train_images"] == str(5 * 10 + 2 * 4)  # images × repeats, both subjects
    assert metadata["ss_instance_prompt"] == "<s0><s1> circle; <s2><s3> square"  # each subject's prompt, in its tokens
    assert {"bundle_emb.sks.clip_l",
            "bundle_emb.zqx.clip_g"} <= set(load_file(out / "pytorch_lora_weights_kohya.safetensors"))
    # a row of validation images per subject, each prompt in the subject's tokens
    training = json.loads(read_safetensors(out / "moslora_adapter.safetensors")[1]["training"])
    assert training["validation_prompts"] == ["a <s0><s1> circle on a gray background", "a <s2><s3> square"]
    grid = Image.open(out / "validation.png")
    assert grid.height == 2 * (grid.width // 2 + 14)  # two rows of two square images, a caption strip under each
    assert "row 2: `a <s2><s3> square`" in (out / "README.md").read_text()


def test_each_subject_gets_class_images_of_its_own_class(world, tmp_path):
    square = tmp_path / "squares"
    square.mkdir()
    rng = random.Random(6)
    for i in range(2):
        save_image(render(sample_scene(rng, shape="square"), 64), square / f"square_{i}.png")
    config = toml(tmp_path / "data.toml", f"""[[datasets]]
  [[datasets.subsets]]
  image_dir = "{world['subject']}"
  class_tokens = "sks circle"
  class_prompt = "a circle"

  [[datasets.subsets]]
  image_dir = "{square}"
  class_tokens = "zqx square"
  class_prompt = "a square"
""")
    out = tmp_path / "run"
    assert main(["--pretrained_model_name_or_path", str(world["model"]), "--output_dir", str(out), "--dataset_config",
                 str(config), *COMMON, "--max_train_steps", "2", "--num_class_images", "2",
                 "--class_inference_steps", "2"]) == 0
    for folder, prompt in (("a_circle", "a circle"), ("a_square", "a square")):
        assert len(list((out / "class_images" / folder).glob("*.png"))) == 2, folder  # drawn, and kept for the next run
    training = json.loads(read_safetensors(out / "moslora_adapter.safetensors")[1]["training"])
    assert training["class_prompts"] == ["a circle", "a square"] and training["num_class_images"] == 4
    assert training["with_prior_preservation"] is True
