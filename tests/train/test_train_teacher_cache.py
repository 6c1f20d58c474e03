"""Teacher top-k cache: round trip, agreement with the live teacher, resumption of a killed
caching run, refusal of mismatched settings."""

import json

import pytest
import torch

from distiq.train import TeacherCache, cache_teacher_outputs, teacher_topk

VOCAB, SEQ = 11, 3


class CountingTeacher:
    """A fixed random linear "teacher": (B, SEQ, 4) features -> (B, SEQ, VOCAB) logits."""

    def __init__(self) -> None:
        self.weight = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(0)) * 3
        self.calls = 0

    def __call__(self, batch):
        self.calls += 1
        return batch["x"] @ self.weight


def _batches(n=10, batch_size=4, start=0):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(n, SEQ, 4, generator=generator)
    return [
        {"x": x[i : i + batch_size], "ids": torch.arange(start + i, start + min(i + batch_size, n))}
        for i in range(0, n, batch_size)
    ]


def test_round_trip_matches_the_live_teacher(tmp_path):
    teacher, batches = CountingTeacher(), _batches()
    cache = cache_teacher_outputs(
        teacher, batches, tmp_path, top_k=5, temperature=2.0, samples_per_shard=3
    )
    assert len(cache) == 10 and cache.complete and cache.vocab_size == VOCAB and cache.top_k == 5
    assert len(json.loads((tmp_path / "index.json").read_text())["shards"]) == 4  # 3+3+3+1
    for batch in batches:
        log_probs, indices = cache.get_batch(batch["ids"])
        assert log_probs.shape == indices.shape == (len(batch["ids"]), SEQ, 5)
        assert log_probs.dtype == torch.float32 and indices.dtype == torch.int64
        # float64 reference: top-k of log_softmax(logits / τ) over the full vocabulary
        reference = torch.log_softmax(teacher(batch).double() / 2.0, dim=-1)
        ref_values, ref_indices = reference.topk(5, dim=-1)
        assert torch.equal(indices, ref_indices)
        torch.testing.assert_close(log_probs.double(), ref_values, rtol=0, atol=1e-6)
        assert (log_probs.exp().sum(-1) < 1).all()  # full-vocabulary log-probs: a tail remains
    assert 3 in cache and 10 not in cache and cache.ids == list(range(10))
    with pytest.raises(KeyError, match="sample 10 is not in the teacher cache"):
        cache.get(10)


def test_a_complete_cache_does_not_run_the_teacher_again(tmp_path):
    cache_teacher_outputs(CountingTeacher(), _batches(), tmp_path, top_k=3)
    teacher = CountingTeacher()
    cache = cache_teacher_outputs(teacher, _batches(), tmp_path, top_k=3)
    assert teacher.calls == 0 and len(cache) == 10


def test_a_killed_caching_run_resumes_where_it_stopped(tmp_path):
    class Dies(CountingTeacher):
        def __call__(self, batch):
            if self.calls == 2:
                raise KeyboardInterrupt  # killed while computing the third batch
            return super().__call__(batch)

    with pytest.raises(KeyboardInterrupt):
        cache_teacher_outputs(Dies(), _batches(), tmp_path, top_k=3, samples_per_shard=4)
    with pytest.raises(ValueError, match="incomplete"):
        TeacherCache(tmp_path)
    partial = TeacherCache(tmp_path, allow_incomplete=True)
    assert len(partial) == 8  # the two finished batches were flushed as shards
    teacher = CountingTeacher()
    cache = cache_teacher_outputs(teacher, _batches(), tmp_path, top_k=3, samples_per_shard=4)
    assert teacher.calls == 1 and len(cache) == 10  # only the missing batch ran
    fresh = cache_teacher_outputs(CountingTeacher(), _batches(), tmp_path / "fresh", top_k=3)
    for i in range(10):
        assert torch.equal(cache.get(i)[0], fresh.get(i)[0]) and torch.equal(
            cache.get(i)[1], fresh.get(i)[1]
        )


def test_settings_ids_and_shapes_are_checked(tmp_path):
    cache_teacher_outputs(CountingTeacher(), _batches(), tmp_path, top_k=3, fingerprint="teacher-a")
    with pytest.raises(ValueError, match=r"top_k: cached 3, asked 4.*overwrite=True"):
        cache_teacher_outputs(
            CountingTeacher(), _batches(), tmp_path, top_k=4, fingerprint="teacher-a"
        )
    with pytest.raises(ValueError, match="fingerprint: cached 'teacher-a', asked 'teacher-b'"):
        cache_teacher_outputs(
            CountingTeacher(), _batches(), tmp_path, top_k=3, fingerprint="teacher-b"
        )
    rebuilt = cache_teacher_outputs(
        CountingTeacher(), _batches(), tmp_path, top_k=4, fingerprint="b", overwrite=True
    )
    assert rebuilt.top_k == 4 and rebuilt.fingerprint == "b"
    duplicated = _batches() + _batches()[:1]
    with pytest.raises(ValueError, match="occurs twice"):
        cache_teacher_outputs(CountingTeacher(), duplicated, tmp_path / "dup", top_k=3)
    with pytest.raises(KeyError, match="no 'sample_id' entry"):
        cache_teacher_outputs(
            CountingTeacher(), _batches(), tmp_path / "key", top_k=3, ids="sample_id"
        )
    with pytest.raises(ValueError, match="top_k must lie in"):
        cache_teacher_outputs(CountingTeacher(), _batches(), tmp_path / "big", top_k=VOCAB + 1)
    with pytest.raises(ValueError, match="did you mean 'float16'"):
        cache_teacher_outputs(
            CountingTeacher(), _batches(), tmp_path / "dt", top_k=3, dtype="float61"
        )


def test_variable_length_samples_string_ids_and_half_storage(tmp_path):
    """A teacher may return one (T_i, V) tensor per sample (e.g. only answer tokens)."""
    logits = [torch.randn(t, VOCAB) for t in (1, 3, 2)]

    def teacher(batch):
        return [logits[i] for i in batch["index"]]

    batches = [{"index": [0, 1], "ids": ["q0", "q1"]}, {"index": [2], "ids": ["q2"]}]
    cache = cache_teacher_outputs(teacher, batches, tmp_path, top_k=2, dtype="bfloat16")
    for i, sample_id in enumerate(["q0", "q1", "q2"]):
        values, indices = cache.get(sample_id)
        ref_values, ref_indices = teacher_topk(logits[i], 2)
        assert torch.equal(indices, ref_indices)
        torch.testing.assert_close(values, ref_values.to(torch.bfloat16).float(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="different shapes"):
        cache.get_batch(["q0", "q1"])
    with pytest.raises(FileNotFoundError, match="no teacher cache"):
        TeacherCache(tmp_path / "nothing")
