"""Type stubs of t5rt (the native module t5rt._t5rt)."""

import os
from typing import Iterator, Literal, Sequence, overload

__version__: str

class GenerationResult:
    """One generated sequence."""

    text: str | None
    """Its text (None when the model has no tokenizer.json)."""
    ids: list[int]
    """Generated ids after the decoder start token, EOS included when produced."""
    score: float | None
    """Beam score (length-normalised log-probability); None unless beam search."""

class Tokenizer:
    """The model's tokenizer.json."""

    vocab_size: int
    def encode(self, text: str) -> list[int]:
        """Text -> ids, with the trailing </s> T5 tokenizers add."""
    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text, without special tokens."""

class TokenStream(Iterator[tuple[int, str]]):
    """(id, text piece) of each new token, as decoded; dropping it cancels the generation."""

    def __iter__(self) -> TokenStream: ...
    def __next__(self) -> tuple[int, str]: ...

_Inputs = str | Sequence[str] | Sequence[Sequence[int]]

class Model:
    """A T5-family checkpoint directory (config.json, model.safetensors, tokenizer.json)
    loaded for generation; Model() is the small bundled model."""

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        device: str = "cpu",
        dtype: Literal["f32", "bf16", "int8"] = "f32",
        threads: int = 0,
    ) -> None: ...
    @staticmethod
    def from_pretrained(
        path: str | os.PathLike[str] | None = None,
        *,
        device: str = "cpu",
        dtype: Literal["f32", "bf16", "int8"] = "f32",
        threads: int = 0,
    ) -> Model: ...
    @property
    def tokenizer(self) -> Tokenizer | None: ...
    @property
    def config(self) -> dict[str, object]: ...
    def generate(
        self,
        inputs: _Inputs,
        *,
        max_new_tokens: int | None = None,
        min_new_tokens: int = 0,
        num_beams: int = 1,
        num_return_sequences: int = 1,
        length_penalty: float = 1.0,
        early_stopping: bool | Literal["never"] | None = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 50,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        no_repeat_ngram_size: int = 0,
        seed: int = 0,
        stop: str | Sequence[str] | None = None,
        batch_size: int = 16,
        return_details: bool = False,
    ) -> (
        str
        | list[str]
        | list[list[str]]
        | list[list[int]]
        | list[list[list[int]]]
        | GenerationResult
        | list[GenerationResult]
        | list[list[GenerationResult]]
    ):
        """Generates with Hugging Face generate() semantics: a string per string input (a
        list for a list), generated ids per id input, lists of n when
        num_return_sequences > 1, GenerationResult objects with return_details=True."""
    def generate_stream(
        self,
        inputs: str | Sequence[int],
        *,
        max_new_tokens: int | None = None,
        min_new_tokens: int = 0,
        num_beams: int = 1,
        length_penalty: float = 1.0,
        early_stopping: bool | Literal["never"] | None = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 50,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        no_repeat_ngram_size: int = 0,
        seed: int = 0,
        stop: str | Sequence[str] | None = None,
    ) -> TokenStream:
        """(id, text piece) for each new token of one input, as it is decoded."""
