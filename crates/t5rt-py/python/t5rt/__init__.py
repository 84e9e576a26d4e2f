"""t5rt: fast inference for T5-family encoder-decoder models (t5, FLAN-T5 / T5 v1.1, mT5).

    import t5rt
    model = t5rt.Model()                      # the bundled model that spells out numbers
    model.generate("spell: 1984")             # 'one thousand nine hundred eighty-four'
    model = t5rt.Model.from_pretrained("./flan-t5-small", dtype="bf16")
    model.generate(["translate English to German: Hello"], num_beams=4)

The work runs in Rust with the GIL released; see help(t5rt.Model.generate).
"""

from ._t5rt import GenerationResult, Model, Tokenizer, TokenStream, __version__

__all__ = ["Model", "Tokenizer", "GenerationResult", "TokenStream", "__version__"]
