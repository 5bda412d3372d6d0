//! The policy model: its tokenizer and chat template.

pub mod tokenizer;

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
