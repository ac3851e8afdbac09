"""The offline tiny SDXL: real SDXL architecture, seeded, saved and reloaded with no network."""

import torch
from diffusers import StableDiffusionXLPipeline

from toyworld.tiny_sdxl import build_tiny_sdxl, build_tokenizer, save_tiny_sdxl


def test_tokenizer_knows_its_words_and_still_spells_the_rest():
    tok = build_tokenizer()
    ids = tok("a photo of sks dog").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert len(ids) == 2 + 5  # one token per known word
    assert tok.decode(ids, skip_special_tokens=True) == "a photo of sks dog"
    unknown = tok("zebra").input_ids
    assert len(unknown) > 3 and tok.decode(unknown, skip_special_tokens=True) == "zebra"


def test_same_seed_same_weights_other_seed_other_weights():
    a, b, c = build_tiny_sdxl(seed=0), build_tiny_sdxl(seed=0), build_tiny_sdxl(seed=1)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        sa, sb, sc = (getattr(p, name).state_dict() for p in (a, b, c))
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
        assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_sdxl_architecture(tiny_pipe):
    unet = tiny_pipe.unet.config
    assert unet.addition_embed_type == "text_time"
    assert unet.cross_attention_dim == tiny_pipe.text_encoder.config.hidden_size * 2
    assert type(tiny_pipe.text_encoder).__name__ == "CLIPTextModel"
    assert type(tiny_pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert tiny_pipe.vae_scale_factor == 2


def test_saved_pipeline_reloads_offline_and_generates(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = save_tiny_sdxl(tmp_path / "tiny", seed=0)
    assert (path / "model_index.json").is_file() and any((path / "tokenizer").iterdir())
    pipe = StableDiffusionXLPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(prompt="a photo of sks dog", num_inference_steps=2, height=64, width=64, output_type="np")
    first = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    again = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    assert first.shape == (1, 64, 64, 3) and (first == again).all()
    assert 0.0 <= first.min() and first.max() <= 1.0 and first.std() > 0.01
    reference = build_tiny_sdxl(seed=0).unet.state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in pipe.unet.state_dict().items())


def test_the_full_size_configs_give_sdxl_base_parameter_counts():
    """SDXL base's published parameter counts: the full-size random model has the real architecture."""
    from diffusers import AutoencoderKL

    from dreambooth_moslora.sdxl import meta_components
    from toyworld.tiny_sdxl import SDXL_VAE_CONFIG

    layout = meta_components()
    with torch.device("meta"):
        vae = AutoencoderKL(**SDXL_VAE_CONFIG)
    counts = {name: sum(p.numel() for p in model.parameters()) for name, model in {**layout, "vae": vae}.items()}
    assert counts == {"unet": 2_567_463_684, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840,
                      "vae": 83_653_863}
