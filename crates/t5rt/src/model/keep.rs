//! Parts of a model kept in f32 whatever the backend's precision, named in `T5RT_KEEP_F32`
//! (comma-separated): a diagnostic for finding where reduced precision's error comes from
//! (`bench/score_accuracy.py --keep-f32`), not a setting anyone needs for normal use.

use crate::error::{Result, T5Error};

/// A part of the model, as `T5RT_KEEP_F32` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    /// The output projection to the vocabulary.
    LmHead,
    /// The feed-forward block's input products (`wi`, or `wi_0` and `wi_1`).
    FfnIn,
    /// The feed-forward block's output product (`wo`).
    FfnOut,
    /// Self-attention's q, k, v and cross-attention's q.
    AttnQkv,
    /// Every attention block's output product (`o`).
    AttnOut,
    /// Cross-attention's k and v products (run once per request, over the encoder output).
    CrossKv,
    /// The cross-attention keys and values themselves (kept in bf16 with bf16 weights, int8
    /// with int8 weights).
    CrossCache,
    /// The decoder's self-attention keys and values (kept in bf16 with bf16 or int8 weights,
    /// where the backend can).
    SelfCache,
    /// Every product of the encoder.
    Encoder,
    /// Every product of the decoder (not the LM head).
    Decoder,
}

impl Part {
    const ALL: [(Part, &'static str); 10] = [
        (Part::LmHead, "lm-head"),
        (Part::FfnIn, "ffn-in"),
        (Part::FfnOut, "ffn-out"),
        (Part::AttnQkv, "attn-qkv"),
        (Part::AttnOut, "attn-out"),
        (Part::CrossKv, "cross-kv"),
        (Part::CrossCache, "cross-cache"),
        (Part::SelfCache, "self-cache"),
        (Part::Encoder, "encoder"),
        (Part::Decoder, "decoder"),
    ];

    /// Whether the checkpoint weight `name` belongs to this part (`head` says whether it is
    /// loaded as the LM head, which a tied model reads from the embedding's name).
    fn holds(self, name: &str, head: bool) -> bool {
        let attn = |proj: &str| {
            ["SelfAttention", "EncDecAttention"]
                .iter()
                .any(|blk| name.ends_with(&format!("{blk}.{proj}.weight")))
        };
        match self {
            Part::LmHead => head,
            Part::FfnIn => name.contains("DenseReluDense.wi"),
            Part::FfnOut => name.contains("DenseReluDense.wo"),
            Part::AttnQkv => {
                attn("q")
                    || ["k", "v"]
                        .iter()
                        .any(|p| name.ends_with(&format!("SelfAttention.{p}.weight")))
            }
            Part::AttnOut => attn("o"),
            Part::CrossKv => ["k", "v"]
                .iter()
                .any(|p| name.ends_with(&format!("EncDecAttention.{p}.weight"))),
            Part::CrossCache | Part::SelfCache => false,
            Part::Encoder => !head && name.starts_with("encoder."),
            Part::Decoder => !head && name.starts_with("decoder."),
        }
    }
}

/// The parts `T5RT_KEEP_F32` names (none when unset).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeepF32(Vec<Part>);

impl KeepF32 {
    /// Parses a comma-separated list of part names.
    pub fn parse(list: &str) -> Result<Self> {
        let mut parts = Vec::new();
        for word in list.split(',').map(str::trim).filter(|w| !w.is_empty()) {
            match Part::ALL.iter().find(|(_, n)| *n == word) {
                Some((p, _)) => parts.push(*p),
                None => {
                    let names: Vec<&str> = Part::ALL.iter().map(|(_, n)| *n).collect();
                    return Err(T5Error::Input(format!(
                        "T5RT_KEEP_F32: unknown part {word:?} (parts: {})",
                        names.join(", ")
                    )));
                }
            }
        }
        Ok(KeepF32(parts))
    }

    /// `T5RT_KEEP_F32` from the environment.
    pub fn from_env() -> Result<Self> {
        match std::env::var("T5RT_KEEP_F32") {
            Ok(v) => Self::parse(&v),
            Err(_) => Ok(KeepF32::default()),
        }
    }

    /// Whether the weight `name` stays f32 (`head`: it is loaded as the LM head).
    pub fn weight(&self, name: &str, head: bool) -> bool {
        self.0.iter().any(|p| p.holds(name, head))
    }

    /// Whether the cross-attention keys and values stay f32.
    pub fn cross_cache(&self) -> bool {
        self.0.contains(&Part::CrossCache)
    }

    /// Whether the decoder's self-attention keys and values stay f32.
    pub fn self_cache(&self) -> bool {
        self.0.contains(&Part::SelfCache)
    }
}

#[cfg(test)]
mod tests {
    use super::KeepF32;

    #[test]
    fn parts_match_the_weights_they_name() {
        let k = KeepF32::parse("ffn-out, cross-kv").unwrap();
        assert!(k.weight("decoder.block.0.layer.2.DenseReluDense.wo.weight", false));
        assert!(!k.weight("decoder.block.0.layer.2.DenseReluDense.wi_0.weight", false));
        assert!(k.weight("decoder.block.3.layer.1.EncDecAttention.k.weight", false));
        assert!(!k.weight("decoder.block.3.layer.1.EncDecAttention.q.weight", false));
        assert!(!k.weight("decoder.block.3.layer.0.SelfAttention.k.weight", false));
        assert!(!k.cross_cache() && !k.self_cache());
        let q = KeepF32::parse("attn-qkv,lm-head,cross-cache").unwrap();
        assert!(q.weight("encoder.block.0.layer.0.SelfAttention.v.weight", false));
        assert!(q.weight("decoder.block.0.layer.1.EncDecAttention.q.weight", false));
        assert!(!q.weight("decoder.block.0.layer.1.EncDecAttention.v.weight", false));
        assert!(q.weight("shared.weight", true));
        assert!(q.cross_cache() && !q.self_cache());
        assert!(KeepF32::parse("self-cache").unwrap().self_cache());
        let e = KeepF32::parse("encoder").unwrap();
        assert!(e.weight("encoder.block.5.layer.1.DenseReluDense.wo.weight", false));
        assert!(!e.weight("decoder.block.5.layer.1.DenseReluDense.wo.weight", false));
        assert!(!e.weight("encoder.embed_tokens.weight", true));
        assert!(KeepF32::parse("lm_head").is_err());
        assert_eq!(KeepF32::parse("").unwrap(), KeepF32::default());
    }
}
