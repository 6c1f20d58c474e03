"""The quantization-aware distillation objective: terms, weights, schedules, balancing.

    L = Σ_term  λ_term · schedule_term(step) · [τ² for kd] · value_term

with every term optional. ``QuantDistillObjective(config)(...)`` returns
``LossOutput(total, terms, raw, weights, extras)``: ``total == sum(terms.values())`` and every
weighted term is a tensor, so the training loop can log each one (``out.log_dict()``).

YAML schema (a recipe's ``objective:`` section; every key optional; defaults shown)
------------------------------------------------------------------------------------
::

    objective:
      balancing: none            # none | uncertainty (Kendall et al. 2018: learned log-variances)
      shift_labels: true         # causal LM: logits[:, t] predict labels[:, t + 1]
      ignore_index: -100         # label value of prompt / padding tokens
      terms:                     # a term that is absent or null is off; `name: {}` = defaults
        task:                    # answer-token cross-entropy, or the task_loss passed in
          weight: 1.0
          schedule: {kind: constant}     # every term takes weight + schedule (below)
          label_smoothing: 0.0
        kd:                      # τ² · D(p_T^τ ‖ p_S^τ) over answer tokens
          weight: 1.0
          divergence: forward_kl # forward_kl | reverse_kl | js | tv | confidence_aware_kl
          temperature: 1.0
          temperature_schedule: null     # e.g. {kind: linear, start: 4.0, end: 1.0, steps: 1000}
          beta: 0.5              # js mixing weight β
          confidence: null       # γ of confidence_aware_kl; null = estimate from each batch
          tokens: answer         # answer | all (every non-padding position)
          distribution: softmax  # softmax | sigmoid (independent per-class scores, detection)
          t2_scaling: true       # multiply by τ² (Hinton)
        feat:                    # Σ_l w_l · d(φ_l(h_l^S), h_l^T)
          weight: 1.0
          distance: mse          # mse | cosine
          normalize: none        # none | l2 | layer (mse only)
          student_layers: []     # module-name globs, e.g. ["model.language_model.layers.*"]
          teacher_layers: []     # ... (both empty: pass student_/teacher_features instead)
          layer_map: null        # [[s, t], ...] indices into the captured lists; null = uniform
          layer_weights: null    # one per pair; null = 1 / #pairs (the mean over pairs)
          output_index: 0        # which element of a tuple output (0 = hidden states)
          project: true          # learned linear φ when widths differ
          visual_weight: 1.0     # relative token weights inside mixed (B, T, D) sequences
          text_weight: 1.0
        attn:                    # attention-map alignment, KL(A_T ‖ A_S) per query row
          weight: 1.0
          loss: kl               # kl | mse
          inputs: probs          # probs | logits
          student_layers: []     # e.g. ["**.self_attn"] with output_attentions=True
          teacher_layers: []
          layer_map: null
          layer_weights: null
          output_index: 1        # Hugging Face attention modules return (output, weights)
        reg:                     # Σ_r d(s_r, t_r): real-valued outputs toward the teacher's
          weight: 1.0            # (boxes of matched detection queries, depth maps)
          loss: l1               # l1 | mse | smooth_l1 (mean over the values)
          giou_weight: 1.0       # boxes ((cx, cy, w, h)): + giou_weight · mean(1 − GIoU)
        pd:                      # D(p_S^fp ‖ p_Sq): the student's own fp path vs its quantized path
          weight: 1.0
          divergence: forward_kl
          temperature: 1.0       # (τ² applied when τ != 1)
          beta: 0.5
          tokens: answer
          every: 1               # compute every N steps (one extra no-grad student forward)
        qk_entropy:              # EdgeQAT: −Σ_h [log(1+Var Q_h) + log(1+Var K_h)], mean over layers,
                                 # on the q/k projections' outputs (from fake-quant weights and
                                 # inputs; Q and K themselves are not re-quantized)
          weight: 1.0
          query_modules: ["**.q_proj"]
          key_modules: ["**.k_proj"]
          head_dim: null         # null = the parent attention module's head_dim attribute
        rounding:                # mean over fake-quant modules of the weight-domain rounding error
          weight: 1.0
          modules: ["**"]        # globs; one names a module and everything under it

    schedule:  {kind: constant | linear | cosine | warmup, start: 0.0, end: 1.0, steps: 0, delay: 0}
      multiplies the term's weight: constant → end; linear / cosine: start → end over `steps`
      after `delay`; warmup: 0 → end. E.g. {kind: warmup, steps: 100}.

Example (the brief's recipe): ``terms: {task: {weight: 1.0}, kd: {weight: 1.0, divergence:
forward_kl, temperature: 2.0, schedule: {kind: warmup, steps: 100}}, pd: {weight: 0.1},
rounding: {weight: 1.0e-4}}`` — write small numbers with a dot (``1.0e-4``): PyYAML reads
``1e-4`` as a string. Unknown keys and bad values are reported together, with "did you mean".
Globs: ``*`` stays within one dotted name component, ``**`` spans components; layer patterns
name exactly the modules to capture (``model.layers.*`` = each decoder layer), while
``rounding.modules`` patterns select subtrees like ``quantize_``'s (``model.language_model``).
Note that ``quantize_`` itself uses ``fnmatch`` (there ``*`` also crosses dots).

The Hinton loss ``α·T²·KL(p_T^T ‖ p_S^T) + (1 − α)·CE`` is ``task: {weight: 1 − α}``, ``kd:
{weight: α, temperature: T, tokens: all}``. Token-mean reduction equals torch's
``F.kl_div(..., reduction="batchmean")`` for ``(N, V)`` logits; code that uses
``reduction="mean"`` divides by the V classes as well — reproduce it with ``kd.weight: α / V``.

Calling it from a training loop
-------------------------------
::

    objective = QuantDistillObjective(recipe["objective"])      # or an ObjectiveConfig
    objective.attach(student=student, teacher=teacher)           # hooks for feat/attn/qk terms
    objective.prepare(step=0, **first_call_kwargs)                # only when feat widths differ
    optimizer = AdamW([*student.parameters(), *objective.parameters()])
    for step, batch in enumerate(loader):
        inputs = adapter.model_inputs(batch)                      # input_ids, pixel_values, ...
        with torch.no_grad():
            teacher_out = teacher(**inputs)                       # fills the teacher captures
        student_out = student(**inputs)                           # fills the student captures
        out = objective(
            step=step,                                            # optimizer step (schedules)
            student_logits=student_out.logits,                    # (B, T, V), classes last
            teacher_logits=teacher_out.logits,                    # (B, T, V) (or teacher_topk)
            labels=inputs["labels"],                              # (B, T), -100 = not an answer
            attention_mask=inputs["attention_mask"],              # (B, T), 1 = real token
            visual_mask=inputs["input_ids"] == image_token_id,    # (B, T), optional
            student_inputs=inputs,                                # pd: rerun in full precision
        )
        out.total.backward(); optimizer.step(); optimizer.zero_grad()
        metrics.write(out.log_dict())

What each argument is for (all keyword-only; give what the active terms need):

- ``step`` (int, required): the optimizer step, 0-based; drives schedules and ``pd.every``.
- ``student_logits`` ``(..., V)``: the fake-quantized student's logits (task, kd, pd).
- ``teacher_logits`` ``(..., V)`` (kd; detached here) or ``teacher_topk = (log_probs, indices)``,
  each ``(..., k)``, from :func:`distiq.distill.teacher_topk` at the kd temperature (a cache).
- ``labels`` ``(...)`` int: targets aligned with the *input* tokens as Hugging Face models take
  them (shifted here when ``shift_labels``); ``ignore_index`` marks prompt and padding. They
  define the answer tokens of token-level terms. ``answer_mask`` ``(...)`` bool is the
  alternative when there are no labels.
- ``attention_mask`` ``(B, T)``: non-padding tokens (``tokens: all``, features, attention rows,
  qk_entropy), applied to captured tensors whose token shape matches.
- ``task_loss`` (scalar tensor): the task term's value when the task is not token CE (detection
  focal + L1 + GIoU, segmentation CE + Dice from ``distiq.tasks``).
- ``student_features`` / ``teacher_features`` (lists of ``(..., D)``) and
  ``student_attentions`` / ``teacher_attentions`` (lists of ``(B, H, T, T)``): pass them when
  the config gives no layer globs (e.g. ``outputs.hidden_states``); otherwise the attached hooks
  supply them.
- ``visual_mask`` ``(B, T)`` bool: visual tokens, for ``feat``'s modality weights.
- ``student_regressions`` / ``teacher_regressions`` (``{name: (N, D)}``, the positions to
  compare already selected): the ``reg`` term's inputs (``boxes`` of matched detection queries as
  (cx, cy, w, h) fractions, ``log_depth`` of depth maps). ``student_fp_regressions``: the
  student's full-precision ones — ``pd`` for outputs without a class distribution (depth) is
  the mean L1 between them and ``student_regressions``.
- ``student`` and ``student_inputs`` (the forward's keyword arguments, or a tuple of
  positional ones): ``pd`` reruns the student under ``distiq.quant.fake_quant_disabled`` without
  gradient (hooks paused); ``student_fp_logits`` ``(..., V)`` replaces that rerun. ``rounding``
  reads the student's fake-quant weights and scales. Both default to the attached student.

Reductions: token-level terms are means over valid tokens (numbers do not change with sequence
length or vocabulary size); ``feat`` / ``attn`` are weighted sums over layer pairs of
token means (default weights 1 / #pairs); ``qk_entropy`` and ``rounding`` are means over layers /
modules. With ``balancing: uncertainty``, task, kd, feat, attn and pd become
``λ (exp(−s) L + s)`` with learned ``s`` (logged as ``log_var/<term>``); qk_entropy and rounding
keep fixed weights.
"""

from distiq.objective.balancing import UncertaintyWeighting
from distiq.objective.config import (
    TERM_NAMES,
    AttentionTerm,
    FeatureTerm,
    KDTerm,
    ObjectiveConfig,
    PDTerm,
    QKEntropyTerm,
    RegressionTerm,
    RoundingTerm,
    TaskTerm,
    Terms,
)
from distiq.objective.objective import LossOutput, QuantDistillObjective
from distiq.objective.schedules import Schedule

__all__ = [
    "TERM_NAMES",
    "AttentionTerm",
    "FeatureTerm",
    "KDTerm",
    "LossOutput",
    "ObjectiveConfig",
    "PDTerm",
    "QKEntropyTerm",
    "QuantDistillObjective",
    "RegressionTerm",
    "RoundingTerm",
    "Schedule",
    "TaskTerm",
    "Terms",
    "UncertaintyWeighting",
]
