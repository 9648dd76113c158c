"""The LLM facade returned by herd.load: the one place that wires loader, tokenizer, chat and generation."""

from __future__ import annotations

import math
import os
from functools import cached_property
from typing import Callable, Iterator, Sequence

import torch

from herd.config import ModelArgs
from herd.errors import ContextOverflow, HerdError, ImageError
from herd.fingerprint import fingerprint
from herd.formats import Checkpoint, open_checkpoint
from herd.decoding import TokenLogprob
from herd.generate import Completion, GenerationStep, ImageFeatures, ImagePlacement, generate_steps
from herd.loader import apply_adapter, apply_adapters, check_vocabulary, load_model
from herd.models import resolve
from herd.model import Transformer
from herd.sampling import SamplingParams
from herd.tokenizer import Tokenizer, load_tokenizer

SAMPLING_FIELDS = set(SamplingParams.__dataclass_fields__)


class LLM:
    """A loaded model with its tokenizer and chat format.

    Attributes: `config` (ModelArgs), `tokenizer`, `fingerprint` (SHA-256 of the exact weights),
    `checkpoint` (where it came from: format, path, quantization, generation), `model` (the nn.Module).
    """

    def __init__(self, checkpoint: Checkpoint, model: Transformer, tokenizer: Tokenizer | None):
        self.checkpoint = checkpoint
        self.model = model
        self._tokenizer = tokenizer
        self.adapter: dict | None = None  # settings of a LoRA adapter applied at load (herd.load(adapter=...))
        self.adapters: dict[str, dict] | None = None  # several, each request choosing (herd.load(adapters=...))
        self.image_features = ImageFeatures()  # encoder outputs by image digest, kept across calls and turns
        self.max_image_pixels = self.max_image_bytes = None  # None: herd.images' defaults

    @property
    def config(self) -> ModelArgs:
        return self.checkpoint.args

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            raise HerdError(f"{self.checkpoint.path}: no tokenizer found next to the weights; token ids only")
        return self._tokenizer

    @cached_property
    def fingerprint(self) -> str:
        """SHA-256 over the canonical tensors: the same for the same weights in any format or sharding. With an
        adapter applied, the SHA-256 of the base's fingerprint and the adapter file's SHA-256 (other weights,
        another fingerprint); `base_fingerprint` is the base's alone."""
        if self.adapter is None:
            return self.base_fingerprint
        import hashlib

        return hashlib.sha256(f"{self.base_fingerprint}+lora:{self.adapter['sha256']}".encode()).hexdigest()

    @cached_property
    def base_fingerprint(self) -> str:
        return fingerprint(self.checkpoint.tensors)

    @property
    def device(self) -> torch.device:
        return self.model.tok_embeddings.weight.device

    @property
    def stop_ids(self) -> set[int]:
        ids = set(self.checkpoint.eos_token_ids)
        if self._tokenizer is not None:
            ids |= set(self._tokenizer.stop_ids)
        return ids

    @torch.inference_mode()
    def logits(self, token_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Float32 logits: [T, vocab] for one sequence, [B, T, vocab] for a [B, T] batch: every row the model's
        output layer has, as transformers returns them. Rows past the tokenizer's tokens (an embedding padded to
        a round size) hold the model's own values here; only generation bans them (sampling never picks an id
        no token stands for), so scores computed from these logits are transformers' scores."""
        tokens = torch.as_tensor(token_ids, dtype=torch.long, device=self.device)
        if tokens.dim() not in (1, 2) or tokens.numel() == 0:
            raise ValueError(f"token_ids must be a non-empty [T] or [B, T] sequence, got shape {tuple(tokens.shape)}")
        if tokens.shape[-1] > self.config.max_seq_len:
            raise ContextOverflow(f"{tokens.shape[-1]} tokens exceed the model's context of {self.config.max_seq_len}")
        rows = self.config.vocab_size + self.config.extra_embeddings
        if int(tokens.min()) < 0 or int(tokens.max()) >= rows:
            raise ValueError(f"token ids must lie in 0..{rows - 1}")
        out = self.model(tokens[None] if tokens.dim() == 1 else tokens)
        return out[0] if tokens.dim() == 1 else out

    def _prompt_ids(self, prompt: str | Sequence[int]) -> list[int]:
        return self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)

    def stream(
        self,
        prompt: str | Sequence[int],
        max_tokens: int = 256,
        stop: str | Sequence[str] | None = None,
        stop_token_ids: Sequence[int] | None = None,
        logprobs: int | None = None,
        images: Sequence[ImagePlacement] = (),
        **sampling,
    ) -> Iterator[GenerationStep]:
        """Yield GenerationSteps as tokens are produced; `step.text` is ready to print.

        Sampling keywords: temperature, top_k, top_p, min_p, repetition_penalty, presence_penalty,
        frequency_penalty, seed (see herd.sampling.SamplingParams). Generation ends at the model's
        end-of-turn tokens, at `stop` strings (not included in the text) or after `max_tokens`. `images`
        (from chat_inputs) put image features at their prompt positions."""
        unknown = set(sampling) - SAMPLING_FIELDS
        if unknown:
            raise TypeError(f"unknown sampling option(s): {sorted(unknown)}; known: {sorted(SAMPLING_FIELDS)}")
        ids = self._prompt_ids(prompt)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        stop_ids = self.stop_ids | set(stop_token_ids or ())
        return generate_steps(
            self.model, self.tokenizer, ids, max_tokens, SamplingParams(**sampling), stop_ids, stops, logprobs,
            images=images, image_features=self.image_features,
        )

    def generate(self, prompt: str | Sequence[int], max_tokens: int = 256, **kwargs) -> Completion:
        """Complete a prompt (text, or token ids used as given). Same options as `stream`."""
        ids = self._prompt_ids(prompt)
        steps = list(self.stream(ids, max_tokens=max_tokens, **kwargs))
        logprobs: list[TokenLogprob] | None = None
        if kwargs.get("logprobs") is not None:
            logprobs = [s.logprob for s in steps]
        return Completion(
            text="".join(s.text for s in steps),
            token_ids=[s.token_id for s in steps],
            finish_reason=steps[-1].finish_reason if steps else "length",
            prompt_tokens=len(ids),
            completion_tokens=len(steps),
            logprobs=logprobs,
        )

    # -- chat -------------------------------------------------------------------------------
    @cached_property
    def chat_format(self):
        from herd.chat import chat_format_for

        return chat_format_for(self.checkpoint.generation, self.checkpoint.chat_template)

    def chat_prompt(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """The token ids the model sees for these OpenAI-shaped messages, ending with the assistant header.
        Messages with images need their features too: use chat_inputs."""
        from herd.chat import extract_images

        # refused before any image is read (a model that cannot see images says so in chat_inputs, also unread)
        if self.sees_images and extract_images(messages)[1]:
            raise ImageError("the messages hold images, whose features token ids alone cannot carry; use "
                             "LLM.chat_inputs (ids and images) or LLM.chat")
        return self.chat_inputs(messages, tools)[0]

    @property
    def sees_images(self) -> bool:
        """Whether this model has an image encoder (Llama 4 with its vision weights)."""
        return self.config.vision is not None

    def chat_inputs(self, messages: list[dict], tools: list[dict] | None = None, read_image=None,
                    max_images: int | None = None,
                    max_total_pixels: int | None = None) -> tuple[list[int], list[ImagePlacement]]:
        """The prompt's token ids and its images (herd.engine.ImagePlacement) for OpenAI-shaped messages whose
        content may hold image parts: {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}
        or a file path as the url. `read_image(url) -> (bytes, name)` reads each image's url (default
        herd.images.image_bytes: data URLs and files; herd serve passes its own, which reads no files).
        `max_images` and `max_total_pixels` bound the images of one call: how many, and their pixels together,
        read from each image's header before any is decoded; each image alone is held to
        `llm.max_image_pixels`. Images are decoded one at a time. Raises herd.errors.ImageError for an image
        the model cannot take."""
        from herd.chat import IMAGE_TOKEN, extract_images, llama4_image_tokens, render

        messages, sources = extract_images(messages)
        if sources and not self.sees_images:
            hint = ""
            if self.checkpoint.format == "gguf" and self.config.is_llama4:
                hint = "; a Llama 4 GGUF sees images with its image projector file: herd.load(..., mmproj=PATH)"
            note = self.checkpoint.metadata.get("note")  # why a checkpoint with an encoder loaded text-only
            why = f": {note}" if note else " (no image encoder): this model takes text only"
            raise ImageError(f"an image part (type 'image_url'), but {self.checkpoint.path.name} cannot see "
                             f"images{why}{hint}")
        ids = render(messages, self.tokenizer, self.chat_format, tools=tools, add_generation_prompt=True)
        if not sources:
            return ids, []
        from herd.images import MAX_BYTES, MAX_PIXELS, decode_image, image_bytes, image_size

        if max_images is not None and len(sources) > max_images:
            raise ImageError(f"{len(sources)} images in one request; the limit is {max_images}")
        vision = self.config.vision
        read = read_image or (lambda source: image_bytes(source, self.max_image_bytes or MAX_BYTES))
        encoded = [read(source) for source in sources]
        per_image = self.max_image_pixels or MAX_PIXELS
        total = sum(math.prod(image_size(data, name, per_image)) for data, name in encoded)
        if max_total_pixels is not None and total > max_total_pixels:
            raise ImageError(f"the {len(encoded)} images hold {total:,} pixels together, more than the limit of "
                             f"{max_total_pixels:,} per request")
        marker = self.tokenizer.special_id(IMAGE_TOKEN)
        at = [i for i, t in enumerate(ids) if t == marker]
        if len(at) != len(encoded):
            raise ImageError(f"the chat format placed {len(at)} image(s) for the {len(encoded)} given")
        if self.config.cross_attention_layers:  # Llama 3.2 Vision: the <|image|> token stays; its tiles are read
            placements = []  # by the cross-attention layers, which every token's keys depend on
            # Meta's tiktoken vocabulary spells <|image|> 128011; the model's row for it is the first past the
            # vocabulary (128256), which Meta's chat format substitutes (llama-models llama3/chat_format.py)
            ids = [vision.image_token_id if t == marker else t for t in ids]
            for where, (data, name) in zip(at, encoded):  # decoded one at a time, dropped once preprocessed
                image = self.preprocess_image(decode_image(data, name, per_image))
                placements.append(ImagePlacement(image.tiles, image.digest, (where,), affects_from=0,
                                                 ratio_id=image.ratio_id, n_tiles=image.n_tiles))
            return ids, placements
        inputs = [self.preprocess_image(decode_image(data, name, per_image))
                  for data, name in encoded]  # decoded one at a time, dropped once preprocessed
        patch = self.tokenizer.special_id("<|patch|>")
        out, placements, last = [], [], 0
        for where, image in zip(at, inputs):
            out += ids[last:where]
            first = len(out)
            for text in llama4_image_tokens(image.arrangement, vision.patches_per_tile):
                token = self.tokenizer.special_id(text)
                if token is None:
                    raise ImageError(f"the tokenizer has no {text} token, which Llama 4's image layout needs")
                out.append(token)
            positions = tuple(i for i in range(first, len(out)) if out[i] == patch)
            placements.append(ImagePlacement(image.tiles, image.digest, positions))
            last = where + 1
        out += ids[last:]
        return out, placements

    def preprocess_image(self, picture):
        """An RGB PIL image (herd.images.decode_image) -> the model's input tiles, prepared with the settings
        of the checkpoint's own image processor (VisionArgs / MllamaVisionArgs): herd.images.ImageInput for
        Llama 4, herd.images.MllamaImage for Llama 3.2 Vision."""
        from herd.images import preprocess_llama4, preprocess_mllama

        v = self.config.vision
        if v is None:
            raise ImageError(f"{self.checkpoint.path.name} has no image encoder")
        if self.config.cross_attention_layers:
            return preprocess_mllama(picture, v.image_size, v.max_num_tiles, v.image_mean, v.image_std,
                                     v.aspect_ratios, v.rescale_factor)
        return preprocess_llama4(picture, v.image_size, v.max_tiles, v.image_mean, v.image_std, v.rescale_factor,
                                 v.resize_to_max_canvas)

    def end_of_turn(self, fmt=None):
        """What ends a reply in chat format `fmt` (default: the model's): herd.chat.formats.EndOfTurn, with
        the checkpoint's own end-of-sequence ids."""
        return (fmt or self.chat_format).end_of_turn(self.tokenizer, self.checkpoint.eos_token_ids)

    def _chat_stops(self, kwargs: dict) -> dict:
        """Add the chat format's end-of-turn strings and tokens to the caller's stops."""
        stop, eot = kwargs.pop("stop", None), self.end_of_turn()
        stops = ([stop] if isinstance(stop, str) else list(stop or [])) + list(eot.texts)
        ids = set(kwargs.pop("stop_token_ids", None) or ()) | eot.token_ids
        return dict(kwargs, stop=stops, stop_token_ids=ids)

    @cached_property
    def sampling_defaults(self) -> tuple[dict, str]:
        """(sampling keywords, where they come from): the settings the checkpoint ships (GGUF general.sampling.*,
        HF generation_config.json: herd.formats.generation_config), else its model card's for a model herd
        knows by name (herd.models); ({}, "") for none. `chat` and `chat_stream` use them for every keyword the
        caller leaves out. A value herd.sampling refuses (top_p 5 in a file) is left out."""
        from herd.formats.generation_config import shipped_sampling
        from herd.models import recommended_sampling

        values, source = shipped_sampling(self.checkpoint)
        if not values:
            values, source = recommended_sampling(self.checkpoint.path)
        usable = {}
        for key, value in values.items():
            try:
                SamplingParams(**{key: value})
            except ValueError:
                continue
            usable[key] = value
        return (usable, source) if usable else ({}, "")

    def _with_defaults(self, kwargs: dict) -> dict:
        return {**self.sampling_defaults[0], **kwargs}

    def chat_stream(self, messages: list[dict], tools: list[dict] | None = None, **kwargs) -> Iterator[GenerationStep]:
        """Stream the assistant's reply to a conversation. Same options as `stream`; sampling keywords left out
        take the model's own settings (`sampling_defaults`)."""
        ids, images = self.chat_inputs(messages, tools)
        return self.stream(ids, images=images, **self._chat_stops(self._with_defaults(kwargs)))

    def chat(self, messages: list[dict], tools: list[dict] | None = None, **kwargs) -> Completion:
        """Answer a conversation (OpenAI message shape). Same options as `generate`; max_tokens defaults to 512,
        and sampling keywords left out take the model's own settings (`sampling_defaults`)."""
        kwargs.setdefault("max_tokens", 512)
        ids, images = self.chat_inputs(messages, tools)
        return self.generate(ids, images=images, **self._chat_stops(self._with_defaults(kwargs)))

    def follow(self) -> None:
        """On a rank other than 0 of a tensor-parallel job (herd.load(tp=N)): run the forwards rank 0
        describes until rank 0 ends (herd.distributed.follow)."""
        from herd.distributed import follow

        follow(self.model, self.device)

    def __repr__(self) -> str:
        a = self.config
        return f"LLM({self.checkpoint.path.name}, {self.checkpoint.format}, dim={a.dim}, layers={a.n_layers})"


def load(
    source: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    progress: Callable[[int, int], None] | None = None,
    quantized: bool | None = None,
    compile: bool | None = None,
    threads: int | None = None,
    adapter: str | os.PathLike | None = None,
    adapters: dict[str, str | os.PathLike] | None = None,
    prompt_int8: bool = False,
    tp: int | None = None,
    ep: int | None = None,
    mmproj: str | os.PathLike | None = None,
) -> LLM:
    """Load a model: a GGUF file, an HF directory (config.json + safetensors), a Meta checkpoint
    directory (params.json + consolidated.NN.pth), a directory written by `herd quantize`, or a known
    alias such as "smollm2-135m" (the default when `source` is None).

    `dtype` may be a torch dtype or "float32"/"bfloat16"/"float16". On the CPU a quantized file (GGUF
    Q4_0/Q4_1/Q4_K/Q8_0/..., `herd quantize` output) stays quantized and computes in bfloat16 unless
    `dtype` is float32 (the exact dequantized path) or `quantized=False`; `quantized=True` insists;
    `quantized="trainable"` keeps the stored weights under modules that backpropagate (QLoRA's base).
    `compile`: torch.compile the decode step (None: herd.runtime decides; needs a C++ compiler).
    `threads`: CPU threads for PyTorch (default: the number of physical cores).
    `adapter`: a PEFT-format LoRA adapter directory (herd's `finetune` output or HF peft's) applied over
    the base, which then loads dense (a quantized file is dequantized); `llm.adapter` holds its settings.
    `adapters`: {name: directory}, several adapters over one base, each engine request choosing one
    (Request.adapter: the 1-based position in this dict, 0 the base), as herd serve's `model` field does;
    `llm.adapters` holds their settings. Generation through `llm.generate` uses the base.
    `prompt_int8`: prompts of 64+ tokens on q4 weights with int8 activations, as llama.cpp computes them
    (faster, no longer exact or batch-independent: herd.transforms.prompt_int8).
    `tp`, `ep`: inside a torchrun job, tensor parallelism over `tp` processes and Llama 4's routed experts
    split over `ep` (herd.transforms.tensor_parallel); each rank reads only its share of the weights. Rank 0
    drives: its `llm` generates as usual, and every other rank calls `llm.follow()`.
    `mmproj`: the image projector file (GGUF, llama.cpp's `mmproj` layout: herd.formats.mmproj) of a Llama 4
    text GGUF, which then sees images. As with llama-server's --mmproj it is never looked for: without it a
    text GGUF loads text-only."""
    from herd.runtime import compile_decode, set_threads

    set_threads(threads)
    if isinstance(dtype, str):
        dtype = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                 "float16": torch.float16, "fp16": torch.float16}[dtype]
    parallel = tp is not None or ep is not None
    checkpoint = open_checkpoint(resolve(source), lazy=parallel)
    if mmproj is not None:
        from herd.formats.mmproj import attach_projector

        if parallel:
            raise HerdError("an mmproj's image encoder loads on one process: tp/ep are not supported with it")
        checkpoint = attach_projector(checkpoint, mmproj)
    # the tokenizer first: it is cheap, and its size is checked against the embedding before the weights load
    tokenizer = load_tokenizer(checkpoint.tokenizer) if checkpoint.tokenizer is not None else None
    if tokenizer is not None:
        check_vocabulary(checkpoint, tokenizer)
    if adapter is not None and adapters:
        raise HerdError("give one adapter (adapter=) or several named ones (adapters=), not both")
    if adapter is not None or adapters:
        if quantized:
            raise HerdError("an adapter applies over a dense base: load it with quantized=False")
        quantized = False
    if parallel:
        from herd.sharded_loader import load_distributed

        if quantized or adapter is not None or adapters:
            raise HerdError("tensor/expert parallelism loads the weights dense (each rank dequantizes its share): "
                            "quantized=True and adapters are not supported with tp/ep")
        model = load_distributed(checkpoint, tp or 1, ep or 1, device, dtype)
        compile = False
    else:
        model = load_model(checkpoint, device=device, dtype=dtype, progress=progress, quantized=quantized)
    settings = apply_adapter(model, adapter, checkpoint.args) if adapter is not None else None
    several = apply_adapters(model, adapters, checkpoint.args) if adapters else None
    if prompt_int8:
        from herd.loader import use_int8_prompts

        if not use_int8_prompts(model):
            raise HerdError("prompt_int8 applies to herd's packed quantized linears; this model has none "
                            "(a quantized file on the CPU, with herd's kernels built)")
    compile_decode(model, compile)
    llm = LLM(checkpoint, model, tokenizer)
    llm.adapter = settings
    llm.adapters = several
    return llm
