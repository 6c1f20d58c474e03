"""ONNX exports of LLaVA, Idefics3, SmolVLM and Qwen2-VL run directories answer the test
questions as the PyTorch model does: in onnxruntime (``OrtVLM``, decoding with the KV cache) and
in onnxruntime-genai (``og.Model`` loading the export's ``genai_config.json``), greedy answers
compared with ``adapter.generate_answers``.

Float models and weight-quantized runs (int8 QDQ, int4 MatMulNBits with float activations)
compute the PyTorch arithmetic up to float reassociation, so their answers must be identical.
Runs that also quantize activations (static 8-bit QDQ) round each activation to a code: an ulp
of difference in a float op before it (onnxruntime's fused RMSNorm, SiLU, convolution) moves a
value at a rounding boundary by one code step, and the logits by up to the bound of
``test_export_onnx.py``. Their answers must be identical except where the PyTorch model itself
hesitates: at the first differing token, the export's token must be within that bound of the
PyTorch maximum (random tiny models have margins of 1e-4 between their top tokens).
"""

import importlib.util
import json

import onnx
import pytest

from distiq.export import check_parity, export_run, load_run
from distiq.quant import PerChannel, PerGroup, PerTensor, QuantSpec

HAS_GENAI = importlib.util.find_spec("onnxruntime_genai") is not None
NO_GENAI = "onnxruntime-genai is not installed (pip install 'distiq[genai]')"

FAMILIES = ("llava", "idefics3", "smolvlm", "qwen2_vl")
W8 = QuantSpec(bits=8, granularity=PerChannel(0))
A8 = QuantSpec(bits=8, symmetric=False, granularity=PerTensor())
W4 = QuantSpec(bits=4, granularity=PerGroup(32))
SCHEMES = {
    "int8": {"*": (W8, None)},
    "int4": {"*": (W4, None)},
    "int8-a8": {"*": (W8, A8)},
    "int4-a8": {"*": (W4, A8)},
}
TIE_BOUND = 2e-3  # logit gap of activation-quantized exports (test_export_onnx.py)
GENAI_TYPES = {
    "llava": "gemma3",
    "idefics3": "gemma3",
    "smolvlm": "gemma3",
    "qwen2_vl": "qwen2_5_vl",
}
EXTRA_QUESTIONS = ("what shape is at the top left?", "are there green circles?")


def questions(families):
    """Five questions on five scenes: the family tests' three and two more."""
    models = families.module.family_models()
    samples = models.vqa_samples(5)
    for sample, question in zip(samples[3:], EXTRA_QUESTIONS):
        sample["question"] = question
    return samples


@pytest.fixture(scope="module")
def exported(families):
    """``get(family, precision)`` -> (run model, adapter, export folder), made once each."""
    cache = {}

    def get(family: str, precision: str):
        if (family, precision) not in cache:
            if precision == "fp32":  # the float model's own folder is a (float) run
                path = families.module.base_model(family, families.root)
            else:
                path = families.make_run(family, f"onnx-{precision}", SCHEMES[precision]).path
            folder = export_run(path, "onnx", precision=precision.split("-")[0])
            run = load_run(path)
            cache[family, precision] = (run.model, run.adapter, folder)
        return cache[family, precision]

    return get


@pytest.mark.parametrize("precision", ["fp32", "int8", "int4"])
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_answers_identical_to_pytorch(exported, families, family, precision):
    model, adapter, folder = exported(family, precision)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["precision"] == precision and manifest["format_version"] == 2
    verification = manifest["verification"]  # export_run's own check on synthetic questions
    assert verification["num_samples"] == 4
    if precision == "fp32":  # (quantized: at onnxruntime's default MatMulNBits accuracy level)
        assert verification["answers_identical"]
        assert verification["genai_answers_identical"] in (None, True)
    samples = questions(families)
    # weight-only layers become MatMulNBits (4- and 8-bit); level 0 keeps float activations
    level = None if precision == "fp32" else 0
    report = check_parity(
        model, folder, samples, adapter=adapter, max_new_tokens=6, threads=1,
        int4_accuracy_level=level, genai=False,
    )  # fmt: skip
    assert len(set(report.answers_torch)) > 1  # the questions do not all get one answer
    assert report.answers_onnx == report.answers_torch
    assert report.max_abs_logit_diff <= 1e-5


@pytest.mark.skipif(not HAS_GENAI, reason=NO_GENAI)
@pytest.mark.parametrize("precision", ["fp32", "int8", "int4"])
@pytest.mark.parametrize("family", FAMILIES)
def test_genai_answers_identical_to_pytorch(exported, families, family, precision):
    """onnxruntime-genai loads the export (og.Model on genai_config.json) and answers as
    PyTorch does."""
    from distiq.export.onnx_genai import GenaiVLM, accuracy_overlay

    model, adapter, folder = exported(family, precision)
    samples = questions(families)
    level = None if precision == "fp32" else 0
    runtime = GenaiVLM(folder, config_overlay=accuracy_overlay(level))
    assert runtime.model.type == GENAI_TYPES[family]
    expected = adapter.generate_answers(model, samples, max_new_tokens=6)
    assert runtime.answers(samples, max_new_tokens=6) == expected


def _torch_ids(model, adapter, sample, eos, max_new_tokens):
    """The prompt batch and PyTorch's greedy new ids (up to the first eos id, excluded)."""
    import torch

    batch = adapter.build_inputs([sample], with_answers=False, reserve=max_new_tokens)
    with torch.no_grad():
        out = model.generate(
            **batch, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
            pad_token_id=adapter.tokenizer.pad_token_id,
        )  # fmt: skip
    new = out[0, batch["input_ids"].shape[1] :].tolist()
    stops = [i for i, token in enumerate(new) if token in eos]
    return batch, new[: stops[0]] if stops else new


def _pytorch_margin(model, batch, prefix, token):
    """PyTorch's max logit minus its logit of ``token`` after the prompt and ``prefix``."""
    import torch

    inputs = dict(batch)
    extra = torch.tensor([prefix], dtype=torch.long).reshape(1, -1)
    inputs["input_ids"] = torch.cat([batch["input_ids"], extra], dim=1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    if "mm_token_type_ids" in batch:
        inputs["mm_token_type_ids"] = torch.cat([batch["mm_token_type_ids"], 0 * extra], dim=1)
    with torch.no_grad():
        logits = model(**inputs).logits[0, -1]
    return float(logits.max() - logits[token])


@pytest.mark.parametrize(
    "runtime",
    [
        "onnxruntime",
        pytest.param("genai", marks=pytest.mark.skipif(not HAS_GENAI, reason=NO_GENAI)),
    ],
)
@pytest.mark.parametrize("precision", ["int8-a8", "int4-a8"])
@pytest.mark.parametrize("family", FAMILIES)
def test_activation_quantized_answers(exported, families, family, precision, runtime):
    """Identical greedy tokens, or a first difference where PyTorch's own top tokens are within
    the export's logit bound (see the module docstring)."""
    model, adapter, folder = exported(family, precision)
    level = 0 if precision.startswith("int4") else None
    if runtime == "genai":
        from distiq.export.onnx_genai import GenaiVLM, accuracy_overlay

        runner = GenaiVLM(folder, config_overlay=accuracy_overlay(level))
    else:
        from distiq.export.ort import OrtVLM

        runner = OrtVLM(folder, threads=1, int4_accuracy_level=level)
    eos = json.loads((folder / "manifest.json").read_text())["vlm"]["eos_token_ids"]
    identical = 0
    samples = questions(families)
    for sample in samples:
        batch, expected = _torch_ids(model, adapter, sample, eos, 6)
        ids = runner.generate_ids(sample["image"], sample["question"], max_new_tokens=6)
        ids = ids[0] if isinstance(ids, tuple) else ids  # OrtVLM also returns prompt logits
        if ids == expected:
            identical += 1
            continue
        ours, theirs = [*ids, eos[0]], [*expected, eos[0]]  # an early stop is a token too
        first = next(i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b)
        margin = _pytorch_margin(model, batch, expected[:first], ours[first])
        assert margin <= TIE_BOUND, (sample["question"], ids, expected, margin)
    assert identical * 2 >= len(samples)  # most answers identical: differences are rare ties


@pytest.mark.parametrize("family", FAMILIES)
def test_quantized_forms_in_every_decoder(exported, family):
    """The decoder keeps the exact QDQ / MatMulNBits forms: int8 weights as INT8/UINT8 codes
    with DequantizeLinear, int4 weights as INT4 blocks (opset 21)."""
    layers = 2 * 7  # 2 layers x (q, k, v, o, gate, up, down)
    for precision, types in (
        ("int8", {onnx.TensorProto.INT8, onnx.TensorProto.UINT8}),
        ("int4", {onnx.TensorProto.INT4}),
    ):
        _, _, folder = exported(family, precision)
        graph = onnx.load(str(folder / "language_model.onnx")).graph
        codes = [t for t in graph.initializer if t.data_type in types and len(t.dims) == 2]
        assert len(codes) == layers, precision
        ops = [n.op_type for n in graph.node]
        assert ops.count("DequantizeLinear") >= layers


@pytest.mark.parametrize("family", FAMILIES)
def test_genai_config_names_the_graphs(exported, family):
    _, adapter, folder = exported(family, "fp32")
    config = json.loads((folder / "genai_config.json").read_text())
    model = config["model"]
    assert model["type"] == GENAI_TYPES[family]
    decoder = model["decoder"]
    graph = onnx.load(str(folder / decoder["filename"])).graph
    inputs = {i.name: i for i in graph.input}
    outputs = {o.name for o in graph.output}
    layers = decoder["num_hidden_layers"]
    for i in range(layers):
        assert decoder["inputs"]["past_key_names"] % i in inputs
        assert decoder["outputs"]["present_value_names"] % i in outputs
    key = inputs["past_key_values.0.key"].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in key] == [
        "batch", decoder["num_key_value_heads"], "past_sequence", decoder["head_size"]
    ]  # fmt: skip
    assert {"inputs_embeds", "attention_mask", "position_ids"} <= set(inputs)
    for section in ("embedding", "vision"):
        names = {i.name for i in onnx.load(str(folder / model[section]["filename"])).graph.input}
        assert set(model[section]["inputs"].values()) == names
    assert config["search"]["past_present_share_buffer"] is False
    assert model["eos_token_id"] in (
        adapter.tokenizer.eos_token_id,
        [adapter.tokenizer.eos_token_id],
    )


@pytest.mark.skipif(not HAS_GENAI, reason=NO_GENAI)
@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_genai_decodes_one_token_per_step(exported, families, family):
    """In onnxruntime-genai, the decoder call that produced the last token took one token and
    the cache of everything before it."""
    from distiq.export.onnx_genai import GenaiVLM

    _, _, folder = exported(family, "int8")
    runtime = GenaiVLM(folder)
    sample = questions(families)[0]
    new = runtime.generate_ids(sample["image"], sample["question"], max_new_tokens=4)
    prompt = runtime.inputs.prepare(sample["image"], sample["question"]).input_ids.shape[1]
    generator = runtime.last_generator
    assert len(new) >= 2  # decoding steps ran after the prompt
    embeds = generator.get_input("inputs_embeds")
    past = generator.get_input("past_key_values.0.key").shape[2]
    assert embeds.shape[:2] == (1, 1)  # one new token, not the sequence
    assert prompt <= past == generator.token_count() - 2  # the prompt and earlier tokens cached
    assert generator.get_output("present.0.key").shape[2] == past + 1
    assert generator.get_input("attention_mask").shape == (1, past + 1)
    expected = (3, 1, 1) if family == "qwen2_vl" else (1, 1)
    assert generator.get_input("position_ids").shape == expected


@pytest.mark.parametrize("family", ["idefics3", "qwen2_vl"])
def test_quantized_vision_tower_and_projector(families, family, tmp_path):
    """Quantized layers in the vision graph too (tower, connector / merger): weight-only int4
    everywhere, exact at MatMulNBits accuracy level 0."""
    from distiq.export import export_onnx
    from distiq.models import load
    from distiq.quant import quantize_

    model, adapter = load(families.module.base_model(family, families.root))
    weight = QuantSpec(bits=4, granularity=PerGroup(16))
    for part in ("vision", "projector", "language_model"):
        quantize_(model, adapter.quant_config(part, weight=weight, model=model))
    export = export_onnx(model.eval(), tmp_path / "onnx", adapter=adapter, precision="int4")
    vision = onnx.load(str(export.graphs["vision"])).graph
    assert sum(t.data_type == onnx.TensorProto.INT4 for t in vision.initializer) >= 4
    report = check_parity(
        model, export.path, questions(families), adapter=adapter, max_new_tokens=6, threads=1,
        int4_accuracy_level=0, genai=False,
    )  # fmt: skip
    assert report.answers_identical and report.max_abs_logit_diff <= 1e-5
