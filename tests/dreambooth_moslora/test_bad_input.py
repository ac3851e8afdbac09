"""Files that are broken, hostile or made for another model: one clear error, nothing changed."""

import json
import os
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from dreambooth_moslora import (
    AdapterConfig,
    AdapterError,
    AdapterFileError,
    AdapterMismatchError,
    adapter_layers,
    inject_components,
    load_adapter,
    pipeline_components,
    save_adapter,
)
from dreambooth_moslora.sdxl import max_abs_diff, sdxl_forward
from toyworld.tiny_sdxl import build_tiny_sdxl

from tests.conftest import PROMPT, randomize_adapter_


@pytest.fixture(scope="module")
def good_files(tmp_path_factory):
    pipe = build_tiny_sdxl(seed=0)
    components = pipeline_components(pipe)
    inject_components(components, AdapterConfig(rank=4, alpha=8.0))
    randomize_adapter_(components)
    return save_adapter(tmp_path_factory.mktemp("good"), components)


def assert_unchanged(pipe, before):
    assert not any(adapter_layers(m) for m in pipeline_components(pipe).values())
    assert max_abs_diff(before, sdxl_forward(pipe, PROMPT)) == 0.0


@pytest.fixture
def pipe_and_outputs():
    pipe = build_tiny_sdxl(seed=0)
    return pipe, sdxl_forward(pipe, PROMPT)


@pytest.mark.parametrize("fmt", ["native", "diffusers", "kohya"])
def test_adapter_for_another_base_model_names_the_first_layer_and_both_shapes(tmp_path, fmt, pipe_and_outputs):
    wider = build_tiny_sdxl(seed=0, block_out_channels=(32, 96, 96))
    components = pipeline_components(wider)
    inject_components(components, AdapterConfig(rank=4))
    randomize_adapter_(components)
    path = save_adapter(tmp_path, components, formats=[fmt])[fmt]
    pipe, before = pipe_and_outputs
    with pytest.raises(AdapterMismatchError) as excinfo:
        load_adapter(pipe, path)
    message = str(excinfo.value)
    assert "\n" not in message
    assert "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_" in message
    assert "96→96 in the adapter" in message and "64→64 in the model" in message
    assert_unchanged(pipe, before)


def _truncated(path, good_files):
    path.write_bytes(good_files["native"].read_bytes()[:-100])


def _layerless(path, good_files):  # it used to "load", silently taking out the adapter already loaded
    save_file({}, path, metadata={"format": "dreambooth-moslora", "adapter_config": '{"rank": 4}'})


@pytest.mark.parametrize("make, message", [(_truncated, "truncated"), (_layerless, "holds no adapter layers")])
def test_a_failed_load_keeps_the_adapter_already_loaded(tmp_path, good_files, make, message):
    pipe = build_tiny_sdxl(seed=0)
    load_adapter(pipe, good_files["native"])
    with_adapter = sdxl_forward(pipe, PROMPT)
    bad = tmp_path / "bad.safetensors"
    make(bad, good_files)
    with pytest.raises(AdapterFileError, match=message):
        load_adapter(pipe, bad)
    assert max_abs_diff(with_adapter, sdxl_forward(pipe, PROMPT)) == 0.0


@pytest.mark.parametrize("keep", [0, 5, 8, 200, -1])
def test_truncated_file(tmp_path, good_files, pipe_and_outputs, keep):
    data = good_files["kohya"].read_bytes()
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(data[: keep if keep >= 0 else len(data) - 1])
    pipe, before = pipe_and_outputs
    with pytest.raises(AdapterFileError, match="truncated|not a safetensors file"):
        load_adapter(pipe, bad)
    assert_unchanged(pipe, before)


class _Marker:
    """Unpickling this would create a file: the loader must never unpickle."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_renamed_to_safetensors_is_refused_without_running_it(tmp_path, pipe_and_outputs):
    marker = tmp_path / "pwned"
    bad = tmp_path / "pytorch_lora_weights.safetensors"
    torch.save({"unet.x.lora_A.weight": torch.zeros(2, 2), "payload": _Marker(str(marker))}, bad)
    pipe, before = pipe_and_outputs
    with pytest.raises(AdapterFileError, match="not a safetensors file"):
        load_adapter(pipe, bad)
    assert not marker.exists()
    assert_unchanged(pipe, before)


def _header_file(path, header: dict, data: bytes = b""):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p.write_bytes(struct.pack("<Q", 2**62) + b"{}"), "header claims"),
        (lambda p: p.write_bytes(struct.pack("<Q", 4) + b"\xff\xfe{]"), "not JSON"),
        (lambda p: _header_file(p, [1, 2]), "not a JSON object"),
        (
            lambda p: _header_file(
                p, {"unet.a.lora_A.weight": {"dtype": "F32", "shape": [10**6, 10**6], "data_offsets": [0, 4 * 10**12]}}
            ),
            "truncated or corrupt",
        ),
        (
            lambda p: _header_file(
                p, {"unet.a.lora_A.weight": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 8]}}, b"\0" * 8
            ),
            "does not fit its bytes",
        ),
        (lambda p: _header_file(p, {"x": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}), "malformed"),
        (lambda p: _header_file(p, {"__metadata__": {"a": 1}}), "metadata"),
    ],
    ids=["absurd-length", "binary-header", "array-header", "absurd-tensor", "wrong-size", "negative-shape", "bad-meta"],
)
def test_malformed_headers(tmp_path, pipe_and_outputs, make, message):
    bad = tmp_path / "bad.safetensors"
    make(bad)
    pipe, before = pipe_and_outputs
    with pytest.raises(AdapterFileError, match=message):
        load_adapter(pipe, bad)
    assert_unchanged(pipe, before)


def test_missing_file_and_foreign_safetensors(tmp_path, pipe_and_outputs):
    pipe, before = pipe_and_outputs
    with pytest.raises(AdapterFileError, match="no such file"):
        load_adapter(pipe, tmp_path / "nope.safetensors")
    foreign = tmp_path / "model.safetensors"
    save_file({"conv_in.weight": torch.zeros(3)}, foreign)
    with pytest.raises(AdapterFileError, match="not a LoRA/MoSLoRA file"):
        load_adapter(pipe, foreign)
    assert_unchanged(pipe, before)


@pytest.mark.parametrize(
    "fmt, layer, down, up, message",
    [
        ("kohya", "lora_unet_output_blocks_99_1_transformer_blocks_0_attn1_to_q", ".lora_down.weight",
         ".lora_up.weight", "output_blocks_99.*matches no layer"),
        ("diffusers", "unet.no_such_block.to_q", ".lora_A.weight", ".lora_B.weight",
         "no linear layer no_such_block.to_q"),
    ],
)
def test_layer_names_the_pipeline_lacks(tmp_path, good_files, pipe_and_outputs, fmt, layer, down, up, message):
    pipe, before = pipe_and_outputs
    tensors = load_file(good_files[fmt])
    tensors[layer + down], tensors[layer + up] = torch.zeros(4, 8), torch.zeros(8, 4)
    save_file(tensors, tmp_path / "extra.safetensors")
    with pytest.raises(AdapterMismatchError, match=message):
        load_adapter(pipe, tmp_path / "extra.safetensors")
    assert_unchanged(pipe, before)


def test_inconsistent_or_non_finite_weights(tmp_path, good_files, pipe_and_outputs):
    pipe, before = pipe_and_outputs
    tensors = load_file(good_files["diffusers"])
    key = next(k for k in tensors if k.endswith("lora_B.weight"))
    nan = dict(tensors)
    nan[key] = torch.full_like(tensors[key], float("nan"))
    save_file(nan, tmp_path / "nan.safetensors")
    with pytest.raises(AdapterFileError, match="non-finite"):
        load_adapter(pipe, tmp_path / "nan.safetensors")
    ranks = dict(tensors)
    ranks[key] = tensors[key][:, :2].contiguous()
    save_file(ranks, tmp_path / "ranks.safetensors")
    with pytest.raises(AdapterFileError, match="inconsistent shapes"):
        load_adapter(pipe, tmp_path / "ranks.safetensors")
    orphan = {k: v for k, v in tensors.items() if k != key}
    save_file(orphan, tmp_path / "orphan.safetensors")
    with pytest.raises(AdapterFileError, match="no up matrix"):
        load_adapter(pipe, tmp_path / "orphan.safetensors")
    assert_unchanged(pipe, before)


def test_writes_are_atomic(tmp_path, good_files, monkeypatch):
    """A crash while writing keeps the previous file and leaves no partial file behind."""
    import dreambooth_moslora.safe_files as safe_files

    pipe = build_tiny_sdxl(seed=0)
    load_adapter(pipe, good_files["native"])
    first = save_adapter(tmp_path, pipeline_components(pipe), formats=["native"])["native"]
    original = first.read_bytes()

    def crash(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safe_files, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(tmp_path, pipeline_components(pipe), formats=["native"])
    assert first.read_bytes() == original
    assert os.listdir(tmp_path) == [first.name]


def test_unknown_format_and_nothing_to_save(tmp_path, tiny_pipe):
    with pytest.raises(AdapterError, match="nothing to save"):
        save_adapter(tmp_path, pipeline_components(tiny_pipe))
    inject_components(pipeline_components(tiny_pipe), AdapterConfig())
    with pytest.raises(AdapterError, match="unknown output format 'ckpt'"):
        save_adapter(tmp_path, pipeline_components(tiny_pipe), formats=["native", "ckpt"])
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- hostile files (issue 15): one line, nothing changed


def _nested_header_file(path, depth: int = 100_000):
    raw = b'{"x": ' + b"[" * depth + b"]" * depth + b"}"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    return path


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: _header_file(p, {"unet.a.lora_A.weight": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}},
                                b"\0" * 4),
         "malformed safetensors entry"),
        (lambda p: _header_file(p,
                                {"unet.a.lora_A.weight": {"dtype": {"F32": 1}, "shape": [1], "data_offsets": [0, 4]}},
                                b"\0" * 4),
         "malformed safetensors entry"),
        (_nested_header_file, "not JSON"),
    ],
    ids=["dtype-list", "dtype-dict", "deeply-nested"],
)
def test_headers_of_the_wrong_type_or_depth(tmp_path, pipe_and_outputs, make, message):
    bad = make(tmp_path / "bad.safetensors")
    pipe, before = pipe_and_outputs
    with pytest.raises(AdapterFileError, match=message) as excinfo:
        load_adapter(pipe, bad)
    assert "\n" not in str(excinfo.value) and str(bad) in str(excinfo.value)
    assert_unchanged(pipe, before)


def _kohya_with(good_files, tmp_path, change) -> "os.PathLike":
    tensors = load_file(good_files["kohya"])
    change(tensors)
    path = tmp_path / "changed.safetensors"
    save_file(tensors, path)
    return path


def _first(tensors, suffix):
    return next(k for k in tensors if k.endswith(suffix))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t: t.__setitem__(_first(t, ".alpha"), torch.zeros(0)), "malformed alpha"),
        (lambda t: t.__setitem__(_first(t, ".alpha"), torch.tensor(-2.0)), "positive"),
        (lambda t: t.__setitem__(_first(t, ".lora_down.weight"),
                                 t[_first(t, ".lora_down.weight")].to(torch.float8_e4m3fn)),
         "float16, bfloat16, float32 or float64 expected"),
        (lambda t: t.__setitem__(_first(t, ".lora_up.weight"), t[_first(t, ".lora_up.weight")].to(torch.int32)),
         "expected"),
    ],
    ids=["alpha-empty", "alpha-negative", "float8", "integers"],
)
def test_kohya_tensors_of_the_wrong_kind(tmp_path, good_files, pipe_and_outputs, change, message):
    bad = _kohya_with(good_files, tmp_path, change)
    pipe, before = pipe_and_outputs
    with pytest.raises(AdapterFileError, match=message) as excinfo:
        load_adapter(pipe, bad)
    assert "\n" not in str(excinfo.value)
    assert_unchanged(pipe, before)


@pytest.mark.parametrize(
    "metadata, message",
    [
        ('[1, 2]', "not a JSON object"),
        ("abc", "not a JSON object"),
        ('{"unet.lora_alpha": "abc"}', "bad lora_alpha"),
        ('{"unet.lora_alpha": -1}', "bad lora_alpha"),
    ],
)
def test_diffusers_metadata_of_the_wrong_type(tmp_path, good_files, pipe_and_outputs, metadata, message):
    tensors = load_file(good_files["diffusers"])
    bad = tmp_path / "meta.safetensors"
    save_file(tensors, bad, metadata={"lora_adapter_metadata": metadata})
    pipe, before = pipe_and_outputs
    with pytest.raises(AdapterFileError, match=message):
        load_adapter(pipe, bad)
    assert_unchanged(pipe, before)


@pytest.mark.parametrize("config", ['["rank", 4]', '{"rank": "4"}', '{"rank": 4, "alpha": [1]}', '{"shape": 1}'])
def test_native_adapter_config_of_the_wrong_type(tmp_path, good_files, pipe_and_outputs, config):
    tensors = load_file(good_files["native"])
    bad = tmp_path / "native.safetensors"
    save_file(tensors, bad, metadata={"format": "dreambooth-moslora", "adapter_config": config})
    pipe, before = pipe_and_outputs
    with pytest.raises(AdapterFileError, match="adapter_config"):
        load_adapter(pipe, bad)
    assert_unchanged(pipe, before)
