//! The policy model: a Llama-family causal LM in tch, its configuration, strict safetensors
//! loading and saving in the Hugging Face layout, exact response log-probabilities, and the
//! tokenizer with its chat template.

pub mod buckets;
pub mod config;
pub mod generate;
pub mod gguf;
pub mod import;
pub mod llama;
pub mod logprobs;
pub mod tokenizer;
pub mod weights;

use crate::event::Content;
use crate::ingest::convert::EncodePair;

impl EncodePair for tokenizer::PolicyTokenizer {
    fn encode_prompt(&self, prompt: &Content) -> Result<Vec<u32>, String> {
        tokenizer::PolicyTokenizer::encode_prompt(self, prompt).map_err(|e| e.to_string())
    }

    fn encode_response(&self, response: &Content) -> Result<Vec<u32>, String> {
        tokenizer::PolicyTokenizer::encode_response(self, response).map_err(|e| e.to_string())
    }
}
