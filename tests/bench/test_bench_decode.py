"""The decode workload: one new token with the KV cache of an L-token prompt, in PyTorch (the
Hugging Face DynamicCache) and in onnxruntime (the exported decoder's past_key_values). Speed
itself is never asserted."""

import pytest
import torch

from distiq.bench import measure_model
from distiq.bench.decode import OrtDecodeStep, TorchDecodeStep, step_embedding
from distiq.export.onnx_parts import language_graph


@pytest.fixture(scope="module")
def tiny(deploy):
    return deploy.tiny_vlm()


def _prompt(model, length, seed=0):
    embeddings = model.get_input_embeddings()
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, embeddings.weight.shape[0], (1, length), generator=generator)
    with torch.no_grad():
        return embeddings(ids).float()


def test_torch_decode_step_gives_the_full_forwards_next_token_logits(tiny):
    model, adapter = tiny
    prompt, step = _prompt(model, 11), step_embedding(model)
    decode = TorchDecodeStep(model, adapter, prompt, step)
    assert decode.cached_length() == 11
    whole = torch.cat([prompt, step], dim=1)  # (1, 12, D): the prompt and the new token
    with torch.no_grad():
        expected = language_graph(model, adapter)(whole, torch.ones(1, 12, dtype=torch.long))
    for _ in range(3):  # each call decodes after the same 11 tokens
        logits = decode()
        assert logits.shape == (1, 1, expected.shape[-1])
        torch.testing.assert_close(logits[0, -1], expected[0, -1], atol=1e-5, rtol=1e-5)
        assert decode.cached_length() == 11
    # and it is not the prompt's last position: the step did attend to the new token
    assert not torch.allclose(logits[0, -1], expected[0, -2], atol=1e-3)


def test_ort_decode_step_feeds_a_cache_of_the_prompt_and_presents_grow(tiny, tmp_path):
    import onnxruntime as ort

    from distiq.export import export_onnx

    model, adapter = tiny
    export_onnx(model, tmp_path / "onnx", adapter=adapter, precision="fp32")
    session = ort.InferenceSession(
        str(tmp_path / "onnx" / "language_model.onnx"), providers=["CPUExecutionProvider"]
    )
    length = 13
    prompt, step = _prompt(model, length), step_embedding(model)
    decode = OrtDecodeStep(session, prompt.numpy(), step.numpy())
    layers = model.config.text_config.num_hidden_layers
    kv_heads = model.config.text_config.num_key_value_heads
    head_dim = model.config.text_config.hidden_size // model.config.text_config.num_attention_heads
    feed = decode.feed
    assert feed["inputs_embeds"].shape == (1, 1, model.config.text_config.hidden_size)
    assert feed["attention_mask"].shape == (1, length + 1)
    assert feed["position_ids"].tolist() == [[length]]
    for i in range(layers):
        for kind in ("key", "value"):
            assert feed[f"past_key_values.{i}.{kind}"].shape == (1, kv_heads, length, head_dim)
    outputs = decode.outputs()
    assert outputs["logits"].shape[:2] == (1, 1)
    assert outputs["present.0.key"].shape == (1, kv_heads, length + 1, head_dim)
    # the cached step's logits are the full forward's last ones (the model's own, in PyTorch)
    whole = torch.cat([prompt, step], dim=1)
    with torch.no_grad():
        expected = language_graph(model, adapter)(whole, torch.ones(1, length + 1).long())
    torch.testing.assert_close(
        torch.from_numpy(decode())[0, -1], expected[0, -1], atol=1e-4, rtol=1e-4
    )


def test_measure_model_times_prefill_and_decode_apart(deploy, tiny):
    model, adapter = tiny
    w4 = deploy.quantized(model, adapter, deploy.W4G32, parts=("language_model",))
    results = measure_model(
        w4, adapter, backends=("pytorch-fp32", "ort-fp32", "ort-int4"),
        workloads=("language_model", "decode"), threads=1, warmup=1, repeats=3, seq_len=20,
    )  # fmt: skip
    by = {(r.workload, r.backend): r for r in results}
    assert len(by) == 6
    for backend in ("pytorch-fp32", "ort-fp32", "ort-int4"):
        decode, prefill = by[("decode", backend)], by[("language_model", backend)]
        assert decode.available and decode.timing.repeats == 3, decode.reason
        assert decode.detail == {"prompt_tokens": 20, "new_tokens": 1}
        assert prefill.detail == {"prompt_tokens": 20}
        assert decode.to_dict()["prompt_tokens"] == 20
    # parity of the int4 export's decode step with the fake-quant model's own (int4 default
    # accuracy level: activations rounded to int8 inside the kernel)
    assert by[("decode", "ort-int4")].max_abs_diff < 0.05
    assert by[("decode", "ort-fp32")].max_abs_diff is None
