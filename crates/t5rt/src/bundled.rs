//! The bundled default model (models/spell-numbers), compiled into the binary so that
//! `t5rt generate "spell: 1984"` works with no download and no path.

use t5rt::{Checkpoint, Result};

/// Shown in logs and errors.
pub const NAME: &str = "bundled spell-numbers model";

const CONFIG: &str = include_str!("../../../models/spell-numbers/config.json");
const GENERATION: &str = include_str!("../../../models/spell-numbers/generation_config.json");
const TOKENIZER: &[u8] = include_bytes!("../../../models/spell-numbers/tokenizer.json");
static WEIGHTS: &[u8] = include_bytes!("../../../models/spell-numbers/model.safetensors");

pub fn checkpoint() -> Result<Checkpoint> {
    Checkpoint::from_static(NAME, CONFIG, WEIGHTS, Some(TOKENIZER), Some(GENERATION))
}
