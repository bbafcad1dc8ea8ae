"""The user verbs of a model (`model.caption(...)`, `model.itm(...)`, `model.save(...)`), as a mixin.

Each is a one-line call into `vlbridge.inference.tasks` (or the checkpoint formats), which take the model as
their first argument: a user can call either. Nothing here knows which bridge the model has.
"""

from __future__ import annotations

from torch import Tensor

from vlbridge.inference import tasks


class UserVerbs:
    """Mixed into the model class; `self` is the model."""

    def caption(self, images, prompt=None, *, num_beams: int = 1, max_new_tokens: int = 30, **kwargs) -> list[str]:
        """Caption images (paths, PIL images or pixel tensors); `prompt`: one for all or one per image."""
        return tasks.caption(self, images, prompt, num_beams=num_beams, max_new_tokens=max_new_tokens, **kwargs)

    def answer(self, images, questions, *, num_beams: int = 1, max_new_tokens: int = 10, **kwargs) -> list[str]:
        """Answer one question per image (a single string is asked of every image)."""
        return tasks.answer(self, images, questions, num_beams=num_beams, max_new_tokens=max_new_tokens, **kwargs)

    def chat(self, image, **kwargs) -> tasks.Chat:
        """Start a multi-turn conversation about one image: `chat = model.chat(img); chat.ask("...")`."""
        return tasks.Chat(self, image, **kwargs)

    def score(self, images, texts, *, prompt=None, **kwargs) -> list[float]:
        """Log-likelihood of each text (+ EOS) given its image and prompt."""
        return tasks.score(self, images, texts, prompt=prompt, **kwargs)

    def rank_answers(self, images, questions, candidates, **kwargs) -> list[str]:
        """Closed-set VQA: the most likely candidate answer for each (image, question)."""
        return tasks.rank_answers(self, images, questions, candidates, **kwargs)

    def itm(self, images, texts, **kwargs) -> list[float]:
        """Match probability of each (image, text) pair."""
        return tasks.itm(self, images, texts, **kwargs)

    def itc(self, images, texts, **kwargs) -> Tensor:
        """[n_images, n_texts] cosine similarity, max over queries."""
        return tasks.itc(self, images, texts, **kwargs)

    def embed_images(self, images, **kwargs) -> Tensor:
        """Multi-vector ITC embeddings [n_images, Q, E] (one per query; an image scores a text by its best one)."""
        return tasks.embed_images(self, images, **kwargs)

    def embed_texts(self, texts, **kwargs) -> Tensor:
        """ITC text embeddings [n_texts, E], in the space of :meth:`embed_images`."""
        return tasks.embed_texts(self, texts, **kwargs)

    def save(self, directory, format: str = "native", **kwargs):
        """Save as `format="native"` (vlbridge) or `format="hf"` (a transformers checkpoint)."""
        from vlbridge.utils.formats import save

        return save(self, directory, format, **kwargs)
