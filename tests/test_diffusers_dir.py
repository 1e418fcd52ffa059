"""`--model diffusers:DIR`: tiny random SD 1.x (ε and v), SDXL, SD3 and Flux pipelines built here (no hub), written
with `save_pretrained` and used through the command line: `sample` writes decoded PNGs of the pipeline's size,
latents with --npz and the folder's fingerprint in the manifest; `bench`, `learn`, `train`, `tune`, `gits` and
`analyze` run on them with a prompt file and guidance. The loaded model's D equals what the pipeline itself
computes (its own loop with fewstep's scheduler, same latents), and bad input is one line and exit code 2.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from PIL import Image  # noqa: E402
from transformers import (  # noqa: E402
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
)

import fewstep  # noqa: E402
from fewstep.cli import main  # noqa: E402
from fewstep.conditioning import conditioned_model, resolve  # noqa: E402
from fewstep.errors import ModelError  # noqa: E402
from fewstep.frames import FLOW  # noqa: E402
from fewstep.integrations.diffusers import FewstepScheduler  # noqa: E402
from fewstep.integrations.diffusers_dir import folder_fingerprint, parse_spec, pipeline_spec  # noqa: E402
from tiny_tokenizer import tiny_clip_tokenizer  # noqa: E402
from fewstep.methods import resolve_method  # noqa: E402
from fewstep.models import load_model  # noqa: E402

PROMPTS = ["a cat", "big dog", "red fox"]
SCHED = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


# ------------------------------------------------------------------------------------------------ tiny pipelines


def _clip(n: int, cls: type = CLIPTextModel) -> torch.nn.Module:
    return cls(CLIPTextConfig(vocab_size=n, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                              num_attention_heads=2, max_position_embeddings=8, bos_token_id=0, eos_token_id=1,
                              pad_token_id=1, projection_dim=16)).eval()


def _vae(blocks: int = 1) -> AutoencoderKL:
    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8,) * blocks, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * blocks, layers_per_block=1,
                         up_block_types=("UpDecoderBlock2D",) * blocks, norm_num_groups=4, sample_size=16).eval()


def _unet(**kwargs: object) -> UNet2DConditionModel:
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), norm_num_groups=4, attention_head_dim=2,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), **kwargs).eval()


def build(kind: str, tmp: Path):
    torch.manual_seed(0)
    tok, n = tiny_clip_tokenizer(tmp / f"tok-{kind}")
    if kind == "sd":  # 2-level VAE: images are twice the latents' size
        return StableDiffusionPipeline(vae=_vae(2), text_encoder=_clip(n), tokenizer=tok,
                                       unet=_unet(cross_attention_dim=16), safety_checker=None,
                                       scheduler=DDIMScheduler(**SCHED, clip_sample=False, set_alpha_to_one=False),
                                       feature_extractor=None, requires_safety_checker=False)
    if kind == "sdxl":
        unet = _unet(cross_attention_dim=32, addition_embed_type="text_time", addition_time_embed_dim=4,
                     projection_class_embeddings_input_dim=6 * 4 + 16, use_linear_projection=True)
        return StableDiffusionXLPipeline(vae=_vae(), text_encoder=_clip(n), tokenizer=tok, tokenizer_2=tok,
                                         text_encoder_2=_clip(n, CLIPTextModelWithProjection), unet=unet,
                                         scheduler=EulerDiscreteScheduler(**SCHED))
    if kind == "sd3":
        transformer = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=1,
                                            attention_head_dim=8, num_attention_heads=2, caption_projection_dim=16,
                                            joint_attention_dim=32, pooled_projection_dim=32, out_channels=4).eval()
        return StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                        vae=_vae(), text_encoder=_clip(n, CLIPTextModelWithProjection), tokenizer=tok,
                                        text_encoder_2=_clip(n, CLIPTextModelWithProjection), tokenizer_2=tok,
                                        text_encoder_3=None, tokenizer_3=None)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                         pooled_projection_dim=16, axes_dims_rope=[4, 4, 8], guidance_embeds=True).eval()
    t5 = T5EncoderModel(T5Config(vocab_size=n, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                 relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=1,
                                 eos_token_id=1)).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(scheduler=scheduler, vae=_vae(), text_encoder=_clip(n), tokenizer=tok, text_encoder_2=t5,
                        tokenizer_2=tok, transformer=transformer)


@pytest.fixture(scope="module")
def pipes(tmp_path_factory) -> dict[str, tuple[object, Path]]:
    """kind → (the pipeline, the folder it was saved to); 'sd-v' is the SD folder with a v-prediction scheduler."""
    root = tmp_path_factory.mktemp("pipelines")
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for kind in ("sd", "sdxl", "sd3", "flux"):
            pipe = build(kind, root)
            pipe.set_progress_bar_config(disable=True)
            pipe.save_pretrained(root / kind)
            out[kind] = (pipe, root / kind)
    shutil.copytree(root / "sd", root / "sd-v")
    cfg = root / "sd-v" / "scheduler" / "scheduler_config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "prediction_type": "v_prediction"}))
    out["sd-v"] = (None, root / "sd-v")
    return out


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def rel(ours: torch.Tensor, ref: torch.Tensor) -> float:
    assert ours.shape == ref.shape and torch.isfinite(ours).all()
    return ((ours.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


# ------------------------------------------------------------------------------------------------ the command line


def test_sample_decodes_pngs_of_the_pipeline_size(pipes, prompts, tmp_path, capsys):
    """SD (ε), default size: 16×16 PNGs from 8×8 latents (VAE factor 2), latents in the .npz, the folder's
    fingerprint in the manifest; a rerun resumes (nothing new), another --negative-prompt is refused."""
    folder = pipes["sd"][1]
    out, npz = tmp_path / "out", tmp_path / "s.npz"
    args = ["sample", "--model", f"diffusers:{folder}", "--prompts", prompts, "--guidance", "3", "--nfe", "3",
            "--seeds", "0-3", "--out", out, "--npz", npz, "--no-progress", "--batch", "3"]
    rc, text, err = run_cli(args, capsys)
    assert rc == 0, err
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 4 and all(Image.open(p).size == (16, 16) and Image.open(p).mode == "RGB" for p in pngs)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["pipeline"]["folder_fingerprint"] == folder_fingerprint(folder)
    assert manifest["pipeline"]["pipeline"] == "StableDiffusionPipeline" and manifest["dtype"] == "float32"
    assert manifest["model"]["shape"] == [4, 8, 8] and manifest["conditions"]["guidance"] == 3.0
    data = np.load(npz)
    assert data["images"].shape == (4, 16, 16, 3) and data["latents"].shape == (4, 4, 8, 8)
    # the PNG of a seed is the decoded latents of that seed, whatever the batch
    model = load_model(f"diffusers:{folder}")
    img = ((model.decode(torch.from_numpy(data["latents"][2:3])).clamp(-1, 1) + 1) * 127.5).round()
    assert np.abs(img[0].permute(1, 2, 0).numpy() - data["images"][2]).max() <= 1
    rc, text, err = run_cli(args, capsys)
    assert rc == 0 and "wrote 0 new" in text, err
    rc, _, err = run_cli([*args, "--negative-prompt", "blurry"], capsys)
    assert rc == 2 and "other settings" in err


@pytest.mark.parametrize("kind,size,schedule", [("sd3", (16, 8), "flow:shift=3"), ("flux", (16, 16), "flow:mu=")])
def test_sample_flow_pipelines(pipes, prompts, tmp_path, capsys, kind, size, schedule):
    """SD3 and Flux: PNGs of --height × --width, flow frame (t ∈ [t_min, 1]), the pipeline's own shift as the
    default grid, guidance against the negative prompt."""
    folder = pipes[kind][1]
    out = tmp_path / "out"
    rc, _, err = run_cli(["sample", "--model", f"diffusers:{folder}", "--prompts", prompts, "--guidance", "2",
                          "--negative-prompt", "ugly & blurry?", "--height", size[0], "--width", size[1], "--nfe", "3",
                          "--seeds", "0-1", "--out", out, "--no-progress"], capsys)
    assert rc == 0, err
    assert [Image.open(p).size for p in sorted(out.glob("*.png"))] == [(size[1], size[0])] * 2
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sigmas"][0] == 1.0 and manifest["model"]["sigma_max"] == 1.0 and manifest["nfe"] == 3
    assert manifest["schedule"]["name"].startswith(schedule)
    assert manifest["pipeline"]["negative_prompt"] == "ugly & blurry?"


def test_bench_learn_tune_on_v_prediction(pipes, prompts, tmp_path, capsys):
    """SD with a v-prediction scheduler: bench on two seeds, a briefly fitted card, and `sample` with it."""
    folder = pipes["sd-v"][1]
    model = load_model(f"diffusers:{folder}")
    assert model.record["prediction_type"] == "v_prediction" and model.frame is not FLOW
    common = ["--model", f"diffusers:{folder}", "--prompts", prompts, "--guidance", "2", "--no-progress"]
    rc, text, err = run_cli(["bench", *common, "--nfe", "3,4", "--n", "2", "--solvers", "euler,dpmpp",
                             "--json", tmp_path / "b.json"], capsys)
    assert rc == 0, err
    records = json.loads((tmp_path / "b.json").read_text())
    assert len(records) == 4 and all(np.isfinite(r["rmse"]) for r in records)
    card = tmp_path / "card"
    rc, text, err = run_cli(["learn", *common, "--nfe", "3", "--pairs", "8", "--val-pairs", "4", "--iters", "3",
                             "--batch", "4", "--teacher-steps", "12", "--out", card], capsys)
    assert rc == 0, err
    assert json.loads((card / "card.json").read_text())["model"]["fingerprint"] == model.fingerprint
    rc, _, err = run_cli(["sample", *common, "--solver", f"learned:{card}", "--seeds", "0-1",
                          "--out", tmp_path / "s"], capsys)
    assert rc == 0 and len(list((tmp_path / "s").glob("*.png"))) == 2, err
    rc, _, err = run_cli(["tune", *common, "--nfe", "3", "--budget", "1", "--n", "2", "--pairs", "8", "--iters", "2",
                          "--out", tmp_path / "tune"], capsys)
    assert rc == 0 and (tmp_path / "tune" / "table.json").is_file(), err


def test_train_gits_analyze_on_flow_and_sdxl(pipes, prompts, tmp_path, capsys):
    """AMED `train` on SD3, `gits` on SDXL, `analyze` on Flux, all with a prompt file (and --dtype bf16 once)."""
    rc, _, err = run_cli(["train", "--model", f"diffusers:{pipes['sd3'][1]}", "--prompts", prompts, "--guidance", "2",
                          "--height", "8", "--width", "8", "--kimg", "0.008", "--batch", "4", "--out",
                          tmp_path / "amed", "--no-progress"], capsys)
    assert rc == 0 and (tmp_path / "amed" / "amed.json").is_file(), err
    rc, _, err = run_cli(["gits", "--model", f"diffusers:{pipes['sdxl'][1]}", "--prompts", prompts, "--dtype", "bf16",
                          "--nfe", "4", "--warmup", "4", "--grid", "12", "--out", tmp_path / "g.json",
                          "--no-progress"], capsys)
    assert rc == 0 and len(json.loads((tmp_path / "g.json").read_text())["sigmas"]) == 5, err
    rc, _, err = run_cli(["analyze", "--model", f"diffusers:{pipes['flux'][1]}", "--prompts", prompts, "--height", "8",
                          "--width", "8", "--n", "4", "--num-steps", "5", "--out", tmp_path / "an", "--no-progress"],
                         capsys)
    assert rc == 0 and (tmp_path / "an" / "summary.json").is_file(), err


# ------------------------------------------------------------------------------------------------ the pipelines' own D


def _guided(folder: Path, prompt: str, guidance: float, **options: object) -> tuple[object, torch.Tensor]:
    """The loaded model with one prompt bound under `guidance`, and a latent noise of its shape."""
    model = load_model(pipeline_spec(str(folder), **options))
    prompt_file = folder.parent / f"one-{abs(hash(prompt))}.txt"
    prompt_file.write_text(prompt)
    with_prompt, spec = resolve(model, None, str(prompt_file), guidance, draw="cycle")
    den = conditioned_model(with_prompt, spec, [0, 1]).denoiser
    return model, den


@pytest.mark.parametrize("kind", ["sd", "sdxl", "sd3", "flux"])
def test_model_equals_the_pipelines_own_loop(pipes, kind):
    """The pipeline run with FewstepScheduler (its own prompt encoding, negative prompt, guidance, SDXL's time ids
    and pooled embeddings, Flux's packing and embedded guidance) equals `fewstep.sample` with the folder's model."""
    pipe, folder = pipes[kind]
    guidance = 1.0 if kind == "flux" else 2.5  # Flux: its embedded guidance (3.5), no true CFG
    size = 16 if kind == "flux" else 8
    model, den = _guided(folder, "a cat", guidance, height=size, width=size)
    z = torch.randn(2, *model.shape, generator=torch.Generator().manual_seed(3))
    sched = FewstepScheduler.from_config(pipe.scheduler.config, solver="euler")
    original = pipe.scheduler
    pipe.scheduler = sched
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            latents = z
            if kind == "flux":
                from fewstep.integrations.diffusers_pipes import pack

                latents = pack(z)
            kwargs = {"guidance_scale": 3.5} if kind == "flux" else {"guidance_scale": guidance}
            out = pipe(["a cat"] * 2, height=size, width=size, num_inference_steps=4, latents=latents.clone(),
                       output_type="latent", **kwargs).images
    finally:
        pipe.scheduler = original
    if kind == "flux":
        from fewstep.integrations.diffusers_pipes import unpack

        out = unpack(out, tuple(z.shape))
    vp = {} if model.frame is FLOW else {"denoise_to_zero": sched.config.final_sigmas_type == "zero"}
    with torch.no_grad():
        ours = fewstep.sample(den, z, "euler", sched.grid, **vp)
    assert rel(ours, out) <= 1e-5


def test_model_info(pipes):
    """Frames, σ / flow-time ranges, default schedules, the flow default grid used where a spec names none."""
    sd = load_model(f"diffusers:{pipes['sd'][1]}")
    assert sd.shape == (4, 8, 8) and sd.schedule == "" and sd.state_dtype == torch.float32
    assert sd.sigma_max == pytest.approx(14.6146, rel=1e-4) and sd.bottleneck is not None
    sd3 = load_model(pipeline_spec(str(pipes["sd3"][1]), height=8, width=8))
    assert sd3.frame is FLOW and sd3.sigma_max == 1.0 and sd3.schedule == "flow:shift=3"
    assert sd3.sigma_min == pytest.approx(3 * 1e-3 / (1 + 2 * 1e-3))
    assert resolve_method("euler", sd3, nfe=4).schedule["name"] == "flow:shift=3"
    assert resolve_method("euler@polynomial", sd3, nfe=4).schedule["name"] == "polynomial"
    flux = load_model(pipeline_spec(str(pipes["flux"][1]), height=16, width=16, embedded_guidance=2.0))
    assert flux.shape == (4, 16, 16) and flux.schedule.startswith("flow:mu=")
    assert flux.record["embedded_guidance"] == 2.0


def test_specs_and_fingerprint(tmp_path):
    spec = pipeline_spec("runs/my pipe", height=64, dtype="fp16", negative_prompt="a & b ?= c")
    assert parse_spec(spec) == ("runs/my pipe", parse_spec(spec)[1])
    options = parse_spec(spec)[1]
    assert (options.height, options.width, options.dtype, options.negative_prompt) == (64, None, "fp16", "a & b ?= c")
    assert pipeline_spec(spec, width=32) == pipeline_spec("runs/my pipe", height=64, width=32, dtype="fp16",
                                                           negative_prompt="a & b ?= c")
    assert pipeline_spec("diffusers:x") == "diffusers:x"
    with pytest.raises(ModelError, match="unknown setting"):
        parse_spec("diffusers:x?heigth=3")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "model_index.json").write_text("{}")
    (tmp_path / "a" / "w.safetensors").write_bytes(bytes(range(256)) * 12000)  # 3 MB: sampled blocks
    fp = folder_fingerprint(tmp_path / "a")
    (tmp_path / "b").mkdir()
    for p in (tmp_path / "a").iterdir():  # a copy with new modification times keeps the fingerprint
        (tmp_path / "b" / p.name).write_bytes(p.read_bytes())
    assert folder_fingerprint(tmp_path / "b") == fp
    data = bytearray((tmp_path / "b" / "w.safetensors").read_bytes())
    data[10] ^= 1
    (tmp_path / "b" / "w.safetensors").write_bytes(bytes(data))
    assert folder_fingerprint(tmp_path / "b") != fp


# ------------------------------------------------------------------------------------------------ bad input


def test_bad_input_is_one_line_and_writes_nothing(pipes, prompts, tmp_path, capsys):
    (tmp_path / "notpipe").mkdir()
    (tmp_path / "notpipe" / "weights.bin").write_bytes(b"x")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    (tmp_path / "empty.txt").write_text("\n")
    shutil.copytree(pipes["sd"][1], tmp_path / "damaged")
    weights = next((tmp_path / "damaged" / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    sd = f"diffusers:{pipes['sd'][1]}"
    cases = [
        (["--model", f"diffusers:{tmp_path / 'notpipe'}"], "no model_index.json"),
        (["--model", f"diffusers:{tmp_path / 'missing'}"], "not found"),
        (["--model", f"diffusers:{tmp_path / 'other'}"], "KandinskyPipeline, which fewstep does not support"),
        (["--model", f"diffusers:{tmp_path / 'damaged'}"], "cannot load the StableDiffusionPipeline"),
        (["--model", sd, "--dtype", "fp8"], "invalid choice"),
        (["--model", sd, "--height", "15"], "multiple of 2"),
        (["--model", sd, "--prompts", tmp_path / "empty.txt"], "has no prompts"),
        (["--model", "gmm", "--height", "16"], "only for --model diffusers:DIR"),
    ]
    for extra, needle in cases:
        out = tmp_path / "out"
        rc, _, err = run_cli(["sample", *extra, "--nfe", "3", "--seeds", "0", "--out", out, "--no-progress"], capsys)
        assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert not out.exists(), extra
    rc, _, err = run_cli(["bench", "--model", f"diffusers:{tmp_path / 'other'}", "--nfe", "3", "--n", "2"], capsys)
    assert rc == 2 and "StableDiffusionPipeline" in err
