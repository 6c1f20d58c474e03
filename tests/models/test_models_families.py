"""Every supported family, tiny, loaded through the adapter from a local directory."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from distiq.models import IGNORE_INDEX, describe, load
from distiq.quant import PerGroup, QuantSpec, quantize_

# ``family`` is parametrized over every supported family by tests/models/conftest.py.


_LOADED: dict = {}


@pytest.fixture
def loaded(family, family_dirs):
    """The family's model loaded once (eager attention); each test gets it in eval mode."""
    if family not in _LOADED:
        _LOADED[family] = load(family_dirs(family), attn_implementation="eager")
    model = _LOADED[family].model
    model.eval()
    model.zero_grad(set_to_none=True)
    return _LOADED[family]


def test_forward_backward_generate(family, loaded, make_samples):
    model, adapter = loaded
    model.train()
    batch = adapter.build_inputs(make_samples())
    out = model(**batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    names = adapter.module_names()
    for part in (names.vision, names.projector, names.language_model):
        module = model.get_submodule(part)
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads), f"no gradient reaches {part}"
    model.zero_grad(set_to_none=True)
    answers = adapter.generate_answers(model, make_samples(), max_new_tokens=3)
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)
    assert model.training  # generate_answers restores the mode


def test_labels_cover_answer_and_eos_only(family, loaded, make_samples):
    _, adapter = loaded
    samples = make_samples()
    batch = adapter.build_inputs(samples)
    labels = batch["labels"]
    tok = adapter.tokenizer
    for i, sample in enumerate(samples):
        ids = labels[i][labels[i] != IGNORE_INDEX].tolist()
        assert ids[-1] == tok.eos_token_id
        assert tok.decode(ids[:-1], skip_special_tokens=True).strip() == sample["answer"]
        # label positions are the answer tokens themselves (the model shifts internally)
        positions = (labels[i] != IGNORE_INDEX).nonzero().flatten()
        assert torch.equal(batch["input_ids"][i, positions], labels[i, positions])
        # no loss on image tokens or padding
        assert not (labels[i] != IGNORE_INDEX)[
            batch["input_ids"][i] == adapter.image_token_id
        ].any()
        assert not (labels[i] != IGNORE_INDEX)[batch["attention_mask"][i] == 0].any()


def test_generation_continues_the_training_prompt(family, loaded, make_samples):
    """The first generated token's logits (left-padded batch, as generate sees it) equal the
    training forward's logits at the end of the prompt (right-padded): same positions, masks
    and image tokens in both layouts."""
    model, adapter = loaded
    model.eval()
    samples = make_samples()
    train = adapter.build_inputs(samples)
    with torch.no_grad():
        train_logits = model(**train).logits
        gen = adapter.build_inputs(samples, with_answers=False)
        out = model.generate(
            **gen,
            max_new_tokens=1,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    first = out.logits[0]  # (B, V)
    for i in range(len(samples)):
        answer_start = int((train["labels"][i] != IGNORE_INDEX).nonzero()[0])
        torch.testing.assert_close(
            first[i], train_logits[i, answer_start - 1], atol=2e-4, rtol=1e-4
        )


def test_batch_answers_match_single_answers(family, loaded, make_samples):
    model, adapter = loaded
    samples = make_samples()
    batched = adapter.generate_answers(model, samples, max_new_tokens=2)
    single = [adapter.generate_answers(model, [s], max_new_tokens=2)[0] for s in samples]
    assert batched == single


def test_image_changes_logits(family, loaded, make_samples, make_scene):
    model, adapter = loaded
    model.eval()
    samples = make_samples(1)
    other = [dict(samples[0], image=make_scene(99))]
    with torch.no_grad():
        a = model(**adapter.build_inputs(samples)).logits
        b = model(**adapter.build_inputs(other)).logits
    assert (a - b).abs().max() > 1e-3, "the image does not reach the logits (zero projector?)"


def test_save_load_round_trip_identical_logits(family, loaded, make_samples, tmp_path):
    model, adapter = loaded
    model.eval()
    batch = adapter.build_inputs(make_samples())
    with torch.no_grad():
        before = model(**batch).logits
    loaded.save_pretrained(tmp_path)
    loaded_again = load(tmp_path, attn_implementation="eager")
    batch2 = loaded_again.adapter.build_inputs(make_samples())
    for key in batch:
        assert torch.equal(batch[key], batch2[key]), key
    with torch.no_grad():
        after = loaded_again.model(**batch2).logits
    assert torch.equal(before, after)


def test_module_names_and_quant_targets(family, loaded, make_samples):
    model, adapter = loaded
    modules = dict(model.named_modules())
    names = adapter.module_names()
    for name in (names.vision, names.projector, names.language_model, names.lm_head):
        assert name in modules, name
    targets = adapter.quant_targets()
    linears = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
    owner = {}
    for part in ("vision", "projector", "language_model", "lm_head"):
        hits = [n for n in linears if targets[part].selects(n)]
        if part in adapter.unquantizable:  # Gemma 3's projector: a matrix, no nn.Linear
            assert not hits and not targets[part].include
            with pytest.raises(ValueError, match=f"no quantizable {part}"):
                adapter.quant_config(part, weight=QuantSpec(bits=8))
            continue
        assert hits, f"{part} selects no linear layer"
        for n in hits:
            assert n not in owner, f"{n} is in both {owner.get(n)} and {part}"
            owner[n] = part
    assert set(owner) == set(linears)  # every linear layer belongs to exactly one part
    # embeddings stay in higher precision; lm_head is its own opt-in part
    for part in ("vision", "projector", "language_model"):
        assert not any(targets[part].selects(n) for n in modules if "embed" in n.split(".")[-1])
        assert not targets[part].selects(names.lm_head)

    # quantize_ accepts each part's config and swaps exactly that part's linear layers
    batch = adapter.build_inputs(make_samples())
    for part in ("vision", "projector", "language_model"):
        if part in adapter.unquantizable:
            continue
        student = copy.deepcopy(model)
        config = adapter.quant_config(part, weight=QuantSpec(bits=8))
        report = quantize_(student, config)
        changed = {c.name for c in report.changes}
        assert {n for n in changed if n in owner} == {n for n, p in owner.items() if p == part}
        assert all(owner.get(n) == part for n in changed), changed
        with torch.no_grad():
            assert torch.isfinite(student(**batch).logits).all()


def test_patch_embedding_is_its_own_opt_in_part(family, loaded, make_samples):
    model, adapter = loaded
    target = adapter.quant_targets()["patch_embedding"]
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if "patch_embedding" in adapter.unquantizable:  # Qwen2-VL: a Conv3d
        assert not target.include
        with pytest.raises(ValueError, match="no quantizable patch_embedding.*Conv3d"):
            adapter.quant_config("patch_embedding", weight=QuantSpec(bits=4))
        return
    assert [n for n in convs if target.selects(n)] == [
        f"{adapter.module_names().vision}.{adapter.patch_embedding_module}"
    ]
    assert not adapter.quant_targets()["vision"].selects(convs[0])  # not in the vision part
    student = copy.deepcopy(model)
    report = quantize_(student, adapter.quant_config("patch_embedding", weight=QuantSpec(bits=4)))
    assert [c.name for c in report.changes] == [convs[0]]
    batch = adapter.build_inputs(make_samples())
    with torch.no_grad():
        assert torch.isfinite(student(**batch).logits).all()


def test_a_recipe_with_every_part_quantizes_each_layer_by_its_own_part(family, loaded):
    """Parts exclude by name within themselves: the vision part's embeddings are still the
    patch_embedding part's and Qwen2-VL's merger (inside the vision tower) the projector's."""
    from distiq.models import PARTS
    from distiq.train.quant_plan import QuantizationConfig, plan_quantization

    model, adapter = loaded
    targets = adapter.quant_targets()
    parts = tuple(p for p in PARTS if targets[p].include)
    bits = {part: 8 - i for i, part in enumerate(parts)}  # a different width per part
    overrides = {part: {"weight": {"bits": bits[part]}} for part in parts}
    plan = plan_quantization(model, adapter, QuantizationConfig(targets=parts, overrides=overrides))
    student = copy.deepcopy(model)
    report = quantize_(student, plan.config(weights=True, activations=False))
    changed = {c.name: c.weight for c in report.changes}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear | nn.Conv2d):
            continue
        owner = next((p for p in parts if targets[p].selects(name)), None)
        if owner is None:
            assert name not in changed, name
        else:
            assert changed[name].startswith(f"int{bits[owner]}"), (name, owner, changed[name])
            assert plan.owner[name] == owner


def test_a_target_that_keeps_no_layer_names_the_layers_and_why(family, loaded):
    """A group that divides no layer's width is an error listing each layer and why, not a
    run that quantizes nothing."""
    from distiq.train.quant_plan import QuantizationConfig, plan_quantization

    model, adapter = loaded
    spec = QuantSpec(bits=4, granularity=PerGroup(48))  # the tiny models' widths: 32 and 64
    config = QuantizationConfig(weight=spec, targets=("language_model",))
    with pytest.raises(ValueError, match="'language_model' keeps no layer.*not a multiple of"):
        plan_quantization(model, adapter, config)
    default = plan_quantization(model, adapter, QuantizationConfig())
    assert default.layers and set(default.owner.values()) <= {
        "vision", "projector", "language_model"
    }  # fmt: skip
    if "projector" in adapter.unquantizable:  # Gemma 3: left out of the defaults, named if asked
        with pytest.raises(ValueError, match="'projector' has no quantizable layer"):
            plan_quantization(model, adapter, QuantizationConfig(targets=("projector",)))


def test_feature_points_capture_hidden_states_and_attention(family, loaded, make_samples):
    model, adapter = loaded
    points = adapter.feature_points(model)
    text = model.config.get_text_config()
    assert len(points.language_layers) == text.num_hidden_layers
    assert points.attention_probs  # loaded with eager attention
    modules = dict(model.named_modules())
    captured = {}
    watch = [*points.vision_layers, *points.language_layers, points.projector]
    watch += [*points.vision_attention, *points.language_attention]
    hooks = [
        modules[n].register_forward_hook(lambda m, i, o, n=n: captured.__setitem__(n, o))
        for n in watch
    ]
    batch = adapter.build_inputs(make_samples())
    with torch.no_grad():
        model(**batch)
    for hook in hooks:
        hook.remove()
    assert set(captured) == set(watch)
    seq = batch["input_ids"].shape[1]
    for name in points.language_layers:
        assert captured[name].shape[:2] == (3, seq)
    for name in (*points.vision_attention, *points.language_attention):
        probs = captured[name][1]
        assert probs is not None and probs.dim() == 4
        torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs.sum(-1)), atol=1e-5, rtol=0)


def test_nf4_config_excludes_layers_narrower_than_a_block(family, loaded, make_samples):
    model, adapter = loaded  # every layer of these tiny models is 32 or 64 wide
    nf4 = QuantSpec(bits=4, format="nf4", granularity=PerGroup(64))
    config = adapter.quant_config("language_model", weight=nf4, model=model)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and adapter.quant_targets()["language_model"].selects(
            name
        ):
            narrow = module.in_features % 64 != 0
            assert (name in config.exclude) == narrow, name
    with pytest.raises(ValueError, match="model="):
        adapter.quant_config("language_model", weight=nf4)


def test_describe_counts_each_part_once(family, loaded):
    model, adapter = loaded
    report = describe(model)
    assert report.family == adapter.family
    assert report.total == sum(p.numel() for p in model.parameters()) == sum(report.params.values())
    names = adapter.module_names()
    projector = sum(p.numel() for p in model.get_submodule(names.projector).parameters())
    params = dict(model.named_parameters())
    projector += sum(params[n].numel() for n in adapter.projector_parameters)  # image_newline
    assert report.params["projector"] == projector
    vision = sum(p.numel() for p in model.get_submodule(names.vision).parameters())
    assert report.params["vision"] == vision - (projector if family.startswith("qwen") else 0)
    assert report.params.get("other", 0) == 0
