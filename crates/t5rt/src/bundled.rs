//! The bundled default model (models/spell-numbers, 1.8M parameters, spells out numbers),
//! compiled into the program (feature `bundled`) so that `t5rt generate "spell: 1984"` and
//! `t5rt.Model()` work with no download and no path.

use crate::{Checkpoint, Result};

/// Shown in logs and errors.
pub const NAME: &str = "bundled spell-numbers model";

const CONFIG: &str = include_str!("../../../models/spell-numbers/config.json");
const GENERATION: &str = include_str!("../../../models/spell-numbers/generation_config.json");
const TOKENIZER: &[u8] = include_bytes!("../../../models/spell-numbers/tokenizer.json");
static WEIGHTS: &[u8] = include_bytes!("../../../models/spell-numbers/model.safetensors");

/// The bundled model as a checkpoint.
pub fn checkpoint() -> Result<Checkpoint> {
    Checkpoint::from_static(NAME, CONFIG, WEIGHTS, Some(TOKENIZER), Some(GENERATION))
}
