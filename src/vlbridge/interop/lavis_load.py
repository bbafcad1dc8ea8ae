"""`vlbridge.load` of a LAVIS `.pth`: the tensors renamed by `interop.lavis`, sizes read off their shapes, the
frozen LLM (and, where the file has none, the EVA ViT) taken from transformers checkpoints."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from vlbridge.errors import CheckpointError
from vlbridge.interop.lavis import _INSTRUCT_KINDS, convert_lavis_state_dict, read_lavis_checkpoint, split_lavis_extras


def load_lavis(
    path: str | Path,
    *,
    language_model: str | Path | None = None,
    vision_model: str | Path | None = None,
    qformer_tokenizer: str | Path | None = None,
    qformer_heads: int | None = None,
    vision_heads: int | None = None,
    image_size: int | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
):
    """Build a vlbridge BLIP-2 model from a LAVIS ``.pth`` checkpoint.

    LAVIS releases hold the bridge (and sometimes the EVA ViT) but not the frozen LLM, and no config: sizes
    are read off the tensor shapes. Head counts cannot be, so they default to 64-wide heads (BERT-base: 12;
    EVA ViT-g: 16) unless given.

    Args:
        path: the ``.pth`` file.
        language_model: hub id or folder of the frozen LLM (and its tokenizer) for generation kinds.
        vision_model: hub id or folder of a transformers BLIP-2 checkpoint whose vision model to use, when the
            ``.pth`` has no ``visual_encoder``.
        qformer_tokenizer: hub id or folder of the BERT tokenizer (ITM/ITC and InstructBLIP).
        qformer_heads, vision_heads, image_size: override what is inferred.
        device, dtype: placement and dtype of the frozen parts.
    """
    import transformers

    from vlbridge.bridges.qformer import QFormerConfig
    from vlbridge.data.images import ImageProcessor, ImageProcessorConfig
    from vlbridge.encoders.vision import FrozenVisionEncoder
    from vlbridge.interop.hf import hf_to_ours
    from vlbridge.models.vlm import PromptStyle, VisionLanguageModel, VLMConfig

    kind, converted = convert_lavis_state_dict(read_lavis_checkpoint(path))
    weights, extras = split_lavis_extras(converted)
    instruct = kind in _INSTRUCT_KINDS
    retrieval = kind == "blip2_qformer"

    # Vision encoder: from the file, or borrowed from a transformers checkpoint.
    if "vision_model.embeddings.patch_embedding.weight" in weights:
        patch = weights["vision_model.embeddings.patch_embedding.weight"]  # [Dv, 3, p, p]
        width, p = patch.shape[0], patch.shape[-1]
        layers = 1 + max(int(k.split(".")[3]) for k in weights if k.startswith("vision_model.encoder.layers."))
        grid = round((weights["vision_model.embeddings.position_embedding"].shape[1] - 1) ** 0.5)
        vcfg = transformers.Blip2VisionConfig(
            hidden_size=width,
            num_hidden_layers=layers,
            patch_size=p,
            image_size=image_size or grid * p,
            num_attention_heads=vision_heads or (16 if width == 1408 else max(1, width // 64)),  # EVA ViT-g: 16
            intermediate_size=weights["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        )
        vision_hf = transformers.Blip2VisionModel(vcfg)
        vision_state = {k[len("vision_model.") :]: v for k, v in weights.items() if k.startswith("vision_model.")}
        missing, unexpected = vision_hf.load_state_dict(vision_state, strict=False)
        if [k for k in missing if not k.startswith("post_layernorm")] or unexpected:
            raise CheckpointError(f"{path}: vision weights do not fit an EVA ViT: {missing[:5]} {unexpected[:5]}")
    elif vision_model is not None:
        from vlbridge.utils.hub import resolve

        donor = transformers.AutoModel.from_pretrained(resolve(vision_model), dtype=dtype or torch.float32)
        vision_hf = donor.vision_model
    else:
        raise CheckpointError(
            f"{path}: this LAVIS checkpoint has no vision encoder weights; pass vision_model= a transformers BLIP-2 "
            "checkpoint (folder or hub id, e.g. Salesforce/blip2-opt-2.7b) to take its EVA ViT from"
        )
    vcfg = vision_hf.config

    # Q-Former sizes from the shapes.
    queries = weights["query_tokens"]  # [1, Q, H]
    H = queries.shape[-1]
    layer_ids = sorted({int(k.split(".")[3]) for k in weights if k.startswith("qformer.encoder.layer.")})
    cross = [i for i in layer_ids if f"qformer.encoder.layer.{i}.crossattention.attention.key.weight" in weights]
    word = weights.get("embeddings.word_embeddings.weight", weights.get("qformer.embeddings.word_embeddings.weight"))
    pos = weights.get(
        "embeddings.position_embeddings.weight", weights.get("qformer.embeddings.position_embeddings.weight")
    )
    qcfg = QFormerConfig(
        hidden_size=H,
        num_layers=len(layer_ids),
        num_heads=qformer_heads or max(1, H // 64),
        intermediate_size=weights["qformer.encoder.layer.0.intermediate_query.dense.weight"].shape[0],
        num_query_tokens=queries.shape[1],
        cross_attention_frequency=cross[1] - cross[0] if len(cross) > 1 else 1,
        encoder_hidden_size=weights[f"qformer.encoder.layer.{cross[0]}.crossattention.attention.key.weight"].shape[1],
        vocab_size=word.shape[0] if word is not None else 30523,
        max_position_embeddings=pos.shape[0] if pos is not None else 512,
        text_input=instruct or retrieval,
    )

    lm = tokenizer = None
    if not retrieval:
        if language_model is None:
            raise CheckpointError(
                f"{path}: a {kind} checkpoint needs its frozen LLM: pass language_model= a hub id or folder "
                "(e.g. facebook/opt-2.7b, google/flan-t5-xl)"
            )
        from vlbridge.utils.hub import resolve

        source = resolve(language_model)
        lm_config = transformers.AutoConfig.from_pretrained(source)
        auto = transformers.AutoModelForSeq2SeqLM if lm_config.is_encoder_decoder else transformers.AutoModelForCausalLM
        lm = auto.from_pretrained(source, dtype=dtype or torch.float32)
        tokenizer = transformers.AutoTokenizer.from_pretrained(source)
        llm_state = {k[len("language_model.") :]: v for k, v in weights.items() if k.startswith("language_model.")}
        if llm_state:
            lm.load_state_dict(llm_state, strict=False)
        d_llm = lm.get_input_embeddings().weight.shape[1]
        if weights["language_projection.weight"].shape[0] != d_llm:
            raise CheckpointError(
                f"{path}: the projection outputs {weights['language_projection.weight'].shape[0]} features but "
                f"{language_model} is {d_llm} wide: wrong LLM for this checkpoint"
            )
    t5 = lm is not None and lm.config.is_encoder_decoder
    bridge_cfg = {
        "kind": "qformer",
        "qformer": dataclasses.asdict(qcfg),
        "vision_norm_eps": 1e-5,  # LAVIS's ln_vision is a default nn.LayerNorm
        "embed_dim": weights["vision_projection.weight"].shape[0] if retrieval else None,
        "instruct": instruct,
    }
    config = VLMConfig(
        bridge=bridge_cfg,
        vision=vcfg.to_dict(),
        vision_layer=-1,
        language=None if lm is None else lm.config.to_dict(),
        prompts=PromptStyle(
            vqa_template="Question: {} Short answer:" if t5 else "Question: {} Answer:",
            caption_prompt="A short image caption:" if instruct else "",
        ),
    )
    model = VisionLanguageModel(config=config, vision=FrozenVisionEncoder(vision_hf, layer=-1), language_model=lm)
    bridge = {hf_to_ours(k): v.float() for k, v in weights.items() if hf_to_ours(k) is not None}
    if "temp" in extras and retrieval:
        bridge["temp"] = extras["temp"].float().reshape(())
    itg_names = {  # LAVIS's ITG head (BERT LM head); its decoder weight is tied to the word embeddings
        "Qformer.cls.predictions.transform.dense.weight": "itg_head.dense.weight",
        "Qformer.cls.predictions.transform.dense.bias": "itg_head.dense.bias",
        "Qformer.cls.predictions.transform.LayerNorm.weight": "itg_head.norm.weight",
        "Qformer.cls.predictions.transform.LayerNorm.bias": "itg_head.norm.bias",
        "Qformer.cls.predictions.bias": "itg_head.decoder.bias",
    }
    if retrieval:
        bridge.update({ours: extras[theirs].float() for theirs, ours in itg_names.items() if theirs in extras})
    result = model.bridge.load_state_dict(bridge, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(("temp", "itg_head."))]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"{path}: bridge weights do not fit: missing {missing[:6]}, unexpected {result.unexpected_keys[:6]}"
        )
    model.tokenizer = tokenizer
    if qformer_tokenizer is not None:
        from vlbridge.utils.hub import resolve

        model.bridge_tokenizer = transformers.AutoTokenizer.from_pretrained(resolve(qformer_tokenizer))
    size = vcfg.image_size if isinstance(vcfg.image_size, int) else vcfg.image_size[0]
    model.image_processor = ImageProcessor(ImageProcessorConfig(image_size=(size, size)))
    return model.to(device)
