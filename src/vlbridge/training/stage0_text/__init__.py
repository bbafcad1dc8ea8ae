"""Stage 0, text side: the small *blind* causal language model that BLIP-2 keeps frozen in the embedded world.

BLIP-2 bridges a frozen vision encoder to a frozen LLM. The embedded synthetic world has no pretrained LLM that
speaks its language, so stage 0 trains one from scratch on the world's text alone — captions and
``"Question: {q} Answer: {a}"`` strings from the train manifests — and then it is frozen like OPT in the paper.
The LM never sees an image; `stage0_baselines.blind_baseline` measures what it can do without one (answering from
the question's wording alone, the same caption for every image), the floor that stages 1 and 2 must beat.

A soft prompt can only steer an LM that has learnt to use what comes before its text. A web-scale LLM has read
countless documents in which a passage (a table, a record, a description) informs the prose after it; a 0.5M-
parameter LM trained on captions alone has not, and in our tests no bridge could make such an LM describe an
image. So part of the world text is such documents: a *scene record* — a
fixed-length, 27-word table, ``size colour shape`` for each of the nine grid cells in reading order, ``empty empty
empty`` where there is nothing (:func:`scene_text`) — followed by ``</s>`` and a caption of that scene, or a
question and its answer. A caption follows the record of the whole scene; a question follows the record of just
the objects its answer depends on (the manifest's ``focus``), as a reading-comprehension text gives the passage
that answers it. (Finding the object in a whole-scene record — "what size is the star" — is what a 2-layer LM did
not learn in the steps the demo can afford: 1500 steps gave 0.58-0.61 VQA accuracy reading the true whole record, at
chance on size and yes/no questions. That look-up is the instruction-aware Q-Former's job: it sees the question
and the image.) The record's word embeddings are perturbed with Gaussian noise while training (``scene_noise``),
so the LM reads approximate embeddings, as a soft prompt gives them; the loss covers only the text after the
record. Other sequences have no record, so the LM also speaks without one (the blind baseline).
`stage0_baselines.scene_oracle` measures what the LM does with the *true* record: the ceiling for a perfect bridge.

What is written (``out_dir``)::

    lm/                  an OPTForCausalLM + its tokenizer in transformers format
                         (AutoModelForCausalLM / AutoTokenizer.from_pretrained(out_dir / "lm"))
    stage0_text.json     config, world fingerprint, val loss / perplexity, timings and the loss curve;
                         written last, so its presence means the run is complete

The package, one concept a module: :mod:`.corpus` (the world text and the scene record), :mod:`.tokenizer` (the
world tokenizer), :mod:`.config` (:class:`Stage0TextConfig`), :mod:`.model` (the OPT decoder, its loss and
validation) and :mod:`.train` (the training run and its cache).
"""

from vlbridge.training.stage0_text.config import Stage0TextConfig
from vlbridge.training.stage0_text.corpus import (
    EMPTY_CELL,
    SCENE_LENGTH,
    VQA_PROMPT,
    load_scene_texts,
    load_world_texts,
    scene_text,
)
from vlbridge.training.stage0_text.tokenizer import (
    BOS_TOKEN,
    EOS_TOKEN,
    IMAGE_TOKEN,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    UNK_TOKEN,
    build_tokenizer,
)
from vlbridge.training.stage0_text.train import train_language_model

__all__ = [
    "BOS_TOKEN",
    "EOS_TOKEN",
    "IMAGE_TOKEN",
    "PAD_TOKEN",
    "UNK_TOKEN",
    "VQA_PROMPT",
    "SCENE_LENGTH",
    "Stage0TextConfig",
    "build_tokenizer",
    "load_scene_texts",
    "load_world_texts",
    "scene_text",
    "train_language_model",
    "EMPTY_CELL",
    "SPECIAL_TOKENS",
]
