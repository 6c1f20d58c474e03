"""``VLMAdapter``: what distiq needs to know about a vision-language model family.

An adapter *describes* a model and never changes it: where its vision tower, projector and
language model live (fully qualified module names), which modules to quantize by default,
where to capture features for distillation, how to turn VQA samples into model inputs, and
how to decode generated answers. One subclass per family (``llava``, ``idefics3``/``smolvlm``,
``qwen2_vl``/``qwen2_5_vl``, ``paligemma``) registers itself in ``ADAPTERS`` by
``config.model_type``; a family subclass only says where its modules are, how it expands
an image into placeholder tokens, and which extra inputs it needs.

An adapter instance is bound to a config, a tokenizer and an image processor (the model's
"processing"), not to the weights: teacher and student of one family share one adapter, and
the model is passed to the methods that run it.

Prompts. When the checkpoint carries a chat template (processor or tokenizer), the prompt is
the template rendered for one user turn ``[image, question]`` with the generation prompt;
otherwise the family's ``default_prompt`` is used (``{image}``, ``{question}`` and ``{bos}``
are filled in); ``prompt_template=`` overrides both. Training sequences are
``prompt + answer_separator + answer + eos`` with the loss on the answer and eos only.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from distiq.models.inputs import sample_field, to_rgb, tokenize_prompts_and_answers
from distiq.models.parts import (
    FeaturePoints,
    ModuleNames,
    QuantTarget,
    attention_modules,
    attention_probs_available,
    layer_list,
    narrow_layers,
)
from distiq.quant import QuantConfig, QuantSpec

if TYPE_CHECKING:
    from PIL import Image

logger = logging.getLogger(__name__)

PARTS = ("vision", "projector", "language_model", "lm_head", "patch_embedding")
DEFAULT_PARTS = ("vision", "projector", "language_model")


class VLMAdapter:
    """Describes one VLM family; subclasses fill the class attributes and ``image_inputs``."""

    family: ClassVar[str] = ""
    model_types: ClassVar[tuple[str, ...]] = ()
    architectures: ClassVar[tuple[str, ...]] = ()
    vision_module: ClassVar[str] = ""
    projector_module: ClassVar[str] = ""
    language_module: ClassVar[str] = ""
    lm_head_module: ClassVar[str] = "lm_head"
    # Modules nested in the vision module that belong to the projector (Qwen2-VL's merger).
    vision_exclude: ClassVar[tuple[str, ...]] = ()
    # Kept at higher precision by default, relative to the vision / language module: the
    # patch + position embeddings and the token embeddings.
    vision_embeddings: ClassVar[str] = "embeddings"
    text_embeddings: ClassVar[str] = "embed_tokens"
    # The vision tower's patch projection (an nn.Conv2d), relative to the vision module: its
    # own opt-in part ``patch_embedding``. None where the family has none that distiq can
    # quantize (the reason in ``unquantizable``).
    patch_embedding_module: ClassVar[str | None] = "embeddings.patch_embedding"
    # Parameters of the projector that live outside its module (LLaVA-NeXT's image_newline).
    projector_parameters: ClassVar[tuple[str, ...]] = ()
    # Parts holding no nn.Linear / nn.Conv2d that distiq can quantize, with the reason.
    unquantizable: ClassVar[dict[str, str]] = {}
    # Whether the vision tower's attention modules can return probabilities (eager).
    vision_attention_probs: ClassVar[bool] = True
    image_placeholder: ClassVar[str] = "<image>"
    default_prompt: ClassVar[str] = "{image}\n{question}"
    answer_separator: ClassVar[str] = " "
    add_special_tokens: ClassVar[bool] = True

    def __init__(
        self,
        config: Any,
        tokenizer: Any,
        image_processor: Any,
        *,
        processor: Any = None,
        chat_template: str | None = None,
        prompt_template: str | None = None,
        processor_config: dict | None = None,
        prefix: str = "",
    ) -> None:
        if tokenizer is None or image_processor is None:
            raise ValueError(
                f"a {self.family} adapter needs a tokenizer and an image processor "
                "(save them next to the model with processor.save_pretrained(path))"
            )
        self.config = config
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.processor = processor
        self.chat_template = chat_template
        self.prompt_template = prompt_template
        self.processor_config = dict(processor_config or {})
        self.prefix = prefix
        if prompt_template is not None and "{question}" not in prompt_template:
            raise ValueError("prompt_template must contain '{question}' (and '{image}')")

    # ------------------------------------------------------------------ description
    def with_prefix(self, prefix: str) -> VLMAdapter:
        """A copy whose module names start with ``prefix`` (the model wrapped as ``prefix``)."""
        other = object.__new__(type(self))
        other.__dict__.update(self.__dict__)
        other.prefix = prefix
        return other

    @classmethod
    def names_for(cls, prefix: str = "") -> ModuleNames:
        """The part names with ``prefix`` prepended (class-level: needs no tokenizer)."""
        return ModuleNames(
            vision=prefix + cls.vision_module,
            projector=prefix + cls.projector_module,
            language_model=prefix + cls.language_module,
            lm_head=prefix + cls.lm_head_module,
        )

    def module_names(self) -> ModuleNames:
        return self.names_for(self.prefix)

    @classmethod
    def targets_for(cls, prefix: str = "") -> dict[str, QuantTarget]:
        """``quant_targets`` at class level (needs no tokenizer). Every pattern names a module
        that exists in the family's models, as ``quantize_`` requires."""
        names = cls.names_for(prefix)
        targets = {
            "vision": QuantTarget(
                (names.vision,),
                (
                    f"{names.vision}.{cls.vision_embeddings}",
                    *(prefix + p for p in cls.vision_exclude),
                ),
            ),
            "projector": QuantTarget((names.projector,)),
            "language_model": QuantTarget(
                (names.language_model,), (f"{names.language_model}.{cls.text_embeddings}",)
            ),
            "lm_head": QuantTarget((names.lm_head,)),
            "patch_embedding": QuantTarget(
                (f"{names.vision}.{cls.patch_embedding_module}",)
                if cls.patch_embedding_module
                else ()
            ),
        }
        for part in cls.unquantizable:
            targets[part] = QuantTarget(())
        return targets

    def quant_targets(self) -> dict[str, QuantTarget]:
        """``{part: QuantTarget}`` for ``vision``, ``projector``, ``language_model``,
        ``lm_head`` and ``patch_embedding``. The first three are what distiq quantizes by
        default; ``lm_head`` and the vision tower's patch projection (``patch_embedding``, a
        convolution) stay at higher precision unless a recipe asks, and the token and position
        embedding tables always do. A part listed in ``unquantizable`` (e.g. Qwen2-VL's Conv3d
        patch projection) has an empty target."""
        return self.targets_for(self.prefix)

    def quant_config(
        self,
        part: str,
        *,
        weight: QuantSpec | None = None,
        activation: QuantSpec | None = None,
        model: nn.Module | None = None,
        exclude: Sequence[str] = (),
    ) -> QuantConfig:
        """A ``QuantConfig`` that quantizes one part (``vision``, ``projector``,
        ``language_model``, ``lm_head``, ``patch_embedding``) with the given specs.

        For blockwise weight specs (``format="nf4"`` or ``PerGroup(g)``) the linear layers of
        that part whose input width is not a multiple of the block (narrower than 64 for NF4)
        are excluded by name, which needs ``model``.
        """
        if weight is None and activation is None:
            raise ValueError("quant_config needs weight= and/or activation= (a QuantSpec)")
        targets = self.quant_targets()
        if part not in targets:
            raise ValueError(f"unknown part {part!r}; parts are {', '.join(targets)}")
        target = targets[part]
        if not target.include:
            reason = self.unquantizable.get(part)
            raise ValueError(
                f"{self.family} models have no quantizable {part}"
                f"{': ' + reason if reason else ''}; drop {part!r} from the quantization targets"
            )
        excluded = [*target.exclude, *exclude]
        block = weight.group_size if weight is not None else None
        if weight is not None and weight.format == "nf4" and block is None:
            block = 64
        if block is not None:
            if model is None:
                raise ValueError(
                    f"a blockwise weight spec (block {block}) needs model= to find the layers "
                    "narrower than the block and exclude them"
                )
            excluded += [n for n in narrow_layers(model, block) if target.selects(n)]
        return QuantConfig(
            weight=weight, activation=activation, include=target.include, exclude=tuple(excluded)
        )

    def feature_points(self, model: nn.Module) -> FeaturePoints:
        """Per-layer capture points of ``model`` (which must contain this family's parts)."""
        names = self.module_names()
        modules = dict(model.named_modules())
        missing = [
            n for n in (names.vision, names.projector, names.language_model) if n not in modules
        ]
        if missing:
            raise ValueError(
                f"the model has no module {', '.join(map(repr, missing))}: is it a {self.family} "
                f"model (and prefix {self.prefix!r} right)?"
            )
        vision_layers = layer_list(modules, names.vision)
        language_layers = layer_list(modules, names.language_model)
        return FeaturePoints(
            vision_layers=vision_layers,
            language_layers=language_layers,
            projector=names.projector,
            vision_attention=(
                attention_modules(modules, vision_layers) if self.vision_attention_probs else ()
            ),
            language_attention=attention_modules(modules, language_layers),
            attention_probs=attention_probs_available(model),
        )

    @staticmethod
    def enable_attention_probs(model: nn.Module) -> None:
        """Switch ``model`` to eager attention, whose attention modules return probabilities."""
        if not hasattr(model, "set_attn_implementation"):
            raise TypeError("enable_attention_probs needs a Hugging Face PreTrainedModel")
        model.set_attn_implementation("eager")

    # ------------------------------------------------------------------ inputs
    @property
    def image_token_id(self) -> int:
        value = getattr(self.config, "image_token_id", None)
        if value is None:
            value = getattr(self.config, "image_token_index", None)
        if value is None:
            raise ValueError(f"the {self.family} config has no image_token_id")
        return int(value)

    @property
    def max_length(self) -> int:
        """The language model's context in tokens (``max_position_embeddings``)."""
        text = self.config.get_text_config()
        return int(getattr(text, "max_position_embeddings", None) or 1_000_000_000)

    def format_prompt(self, question: str) -> str:
        """The prompt text for ``question`` with one ``image_placeholder`` (not expanded)."""
        if self.prompt_template is None and self.chat_template:
            messages = [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
            ]
            text = self.tokenizer.apply_chat_template(
                messages,
                chat_template=self.chat_template,
                add_generation_prompt=True,
                tokenize=False,
            )
            bos = self.tokenizer.bos_token
            if self.add_special_tokens and bos and text.startswith(bos):
                text = text[len(bos) :]  # the tokenizer adds it again
        else:
            template = self.prompt_template or self.default_prompt
            text = template.format(
                image=self.image_placeholder, question=question, bos=self.tokenizer.bos_token or ""
            )
        if text.count(self.image_placeholder) != 1:
            raise ValueError(
                f"the {self.family} prompt must contain the image placeholder "
                f"{self.image_placeholder!r} exactly once, got {text!r}; fix prompt_template "
                "or the chat template"
            )
        return text

    def image_inputs(self, images: list[Image.Image]) -> tuple[dict[str, torch.Tensor], list[str]]:
        """Model image inputs for RGB ``images`` and, per image, the text that replaces the
        placeholder (the image tokens). Implemented by each family."""
        raise NotImplementedError(f"{type(self).__name__} must implement image_inputs")

    def extra_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Family-specific extra tensors computed from ``input_ids`` / ``answer_mask``."""
        return {}

    def build_inputs(
        self, samples: Sequence[dict], *, with_answers: bool = True, reserve: int = 0
    ) -> dict[str, torch.Tensor]:
        """Model keyword arguments for a list of VQA samples (see contracts: ``image``,
        ``question``, ``answer``).

        Returns a dict with ``input_ids`` (B, L), ``attention_mask`` (B, L), the family's image
        tensors (``pixel_values`` ...), family extras, and with answers ``labels`` (B, L):
        answer token ids and eos, -100 elsewhere (prompt, image tokens, padding). Without
        answers the batch is left-padded for ``generate``. ``reserve`` tokens are kept free
        in the context (``max_new_tokens``). Images are converted to RGB (RGBA over white)
        and resized by the image processor to the model's resolution.
        """
        if isinstance(samples, dict):
            samples = [samples]
        if not samples:
            raise ValueError("build_inputs needs at least one sample")
        images = [
            to_rgb(sample_field(s, "image", i, object), where=f"sample {i} image")
            for i, s in enumerate(samples)
        ]
        questions = [sample_field(s, "question", i, str) for i, s in enumerate(samples)]
        answers = None
        if with_answers:
            answers = [sample_field(s, "answer", i, str) for i, s in enumerate(samples)]
        image_kwargs, expansions = self.image_inputs(images)
        prompts = []
        for question, expansion in zip(questions, expansions):
            prompts.append(
                self.format_prompt(question).replace(self.image_placeholder, expansion, 1)
            )
        tokens = tokenize_prompts_and_answers(
            self.tokenizer,
            prompts,
            answers,
            answer_separator=self.answer_separator,
            add_special_tokens=self.add_special_tokens,
            max_length=self.max_length,
            reserve=reserve,
        )
        batch: dict[str, torch.Tensor] = {
            "input_ids": tokens.input_ids,
            "attention_mask": tokens.attention_mask,
            **image_kwargs,
        }
        batch.update(self.extra_inputs({**batch, "answer_mask": tokens.answer_mask}))
        if tokens.labels is not None:
            batch["labels"] = tokens.labels
        return batch

    @torch.no_grad()
    def generate_answers(
        self, model: nn.Module, samples: Sequence[dict], *, max_new_tokens: int = 8
    ) -> list[str]:
        """Greedy answers for ``samples`` as stripped strings (special tokens removed)."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if not hasattr(model, "generate"):
            raise TypeError(
                f"{type(model).__name__} cannot generate; pass the Hugging Face model "
                "(for VLMWithHeads: wrapper.vlm)"
            )
        inputs = self.build_inputs(samples, with_answers=False, reserve=max_new_tokens)
        device = next(model.parameters()).device
        inputs = {k: v.to(device) for k, v in inputs.items()}
        eos = {self.tokenizer.eos_token_id}
        configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos |= set(configured if isinstance(configured, list) else [configured])
        eos.discard(None)
        pad_id = self.tokenizer.pad_token_id
        was_training = model.training
        model.eval()
        try:
            output = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=sorted(eos),
                pad_token_id=pad_id if pad_id is not None else self.tokenizer.eos_token_id,
            )
        finally:
            model.train(was_training)
        sequences = output.sequences if hasattr(output, "sequences") else output
        new_tokens = sequences[:, inputs["input_ids"].shape[1] :]
        texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        return [t.strip() for t in texts]

    # ------------------------------------------------------------------ saving / loading
    def save_pretrained(self, path: str | Path) -> None:
        """Save the processing (processor, or tokenizer + image processor + chat template)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if self.processor is not None:
            self.processor.save_pretrained(path)
            return
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)
        if self.chat_template and not getattr(self.tokenizer, "chat_template", None):
            (path / "chat_template.jinja").write_text(self.chat_template)
        if self.processor_config:
            (path / "processor_config.json").write_text(json.dumps(self.processor_config, indent=2))

    @classmethod
    def from_pretrained(cls, path: str | Path, config: Any, **kwargs: Any) -> VLMAdapter:
        """Load the processing saved next to a model in the local directory ``path``."""
        from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

        path = Path(path)
        trust = kwargs.pop("trust_remote_code", False)
        processor = None
        try:
            processor = AutoProcessor.from_pretrained(
                path, local_files_only=True, trust_remote_code=trust
            )
        except Exception as error:  # e.g. a processor needing torchvision or num2words
            logger.info(
                "no usable processor in %s (%s); using tokenizer + image processor", path, error
            )
        if processor is not None and not hasattr(processor, "image_processor"):
            processor = None  # AutoProcessor fell back to a bare tokenizer or image processor
        if processor is not None:
            tokenizer, image_processor = processor.tokenizer, processor.image_processor
        else:
            try:
                tokenizer = AutoTokenizer.from_pretrained(
                    path, local_files_only=True, trust_remote_code=trust
                )
                image_processor = AutoImageProcessor.from_pretrained(
                    path, local_files_only=True, trust_remote_code=trust
                )
            except (OSError, ValueError) as error:
                raise FileNotFoundError(
                    f"{path} holds no usable tokenizer and image processor ({error}); save them "
                    "with processor.save_pretrained(path) (or tokenizer and image processor)"
                ) from error
        chat_template = getattr(processor, "chat_template", None) or getattr(
            tokenizer, "chat_template", None
        )
        if chat_template is None and (path / "chat_template.jinja").is_file():
            chat_template = (path / "chat_template.jinja").read_text()
        processor_config = {}
        if processor is None and (path / "processor_config.json").is_file():
            processor_config = json.loads((path / "processor_config.json").read_text())
        return cls(
            config,
            tokenizer,
            image_processor,
            processor=processor,
            chat_template=chat_template,
            processor_config=processor_config,
            **kwargs,
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(family={self.family!r}, prefix={self.prefix!r})"
