//! The policy's tokenizer and chat template, loaded from a Hugging Face model folder.
//!
//! [`PolicyTokenizer::from_dir`] reads the files `transformers` reads for the same purpose:
//!
//! - `tokenizer.json` (required): the `tokenizers` pipeline, byte-level BPE or any other;
//! - `tokenizer_config.json` (required): `chat_template`, `eos_token`, `pad_token`,
//!   `bos_token`;
//! - `chat_template.jinja` (optional): the chat template as a file of its own, which takes
//!   precedence over `tokenizer_config.json`'s, as it does in `transformers` 5;
//! - `generation_config.json` (optional): `eos_token_id`, an id or a list of ids, and
//!   `pad_token_id`.
//!
//! A prompt is rendered with the chat template the way `transformers`'
//! `apply_chat_template(messages, add_generation_prompt=True)` renders it (Jinja with
//! `trim_blocks`, `lstrip_blocks` and loop controls; common Python string methods such as
//! `.strip()`), then encoded without adding special tokens, since the template wrote them.
//! A response is encoded on its own: the trainer concatenates prompt ids, response ids and
//! [`PolicyTokenizer::eos_id`].
//!
//! Special tokens written literally inside a prompt or response (say, a user typing
//! `<|im_end|>`) are encoded as those special tokens, as `transformers` does by default
//! (`sanitize_control_tokens=False`) and as serving stacks tokenize the same prompt, so the
//! policy trains on the ids it is served.
//!
//! A template that calls `tojson` on the path a prompt takes fails to render (a
//! [`TokenizerError::Render`]) rather than render differently from Python's `json.dumps`:
//! rebeld passes no tools and no documents, where templates use it.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use minijinja::syntax::SyntaxConfig;
use minijinja::{context, AutoEscape, Environment, ErrorKind, Value};
use serde::Deserialize;
use tokenizers::Tokenizer;

use crate::event::{Content, Turn};

/// The pipeline file, required.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// The tokenizer's settings and, in older layouts, its chat template; required.
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";
/// The chat template on its own, as `transformers` 5 saves it; optional.
pub const CHAT_TEMPLATE_FILE: &str = "chat_template.jinja";
/// Generation defaults, the stop ids among them; optional.
pub const GENERATION_CONFIG_FILE: &str = "generation_config.json";

/// What joins the turns of a response given as messages, and the turns of a prompt when the
/// folder has no chat template.
pub const TURN_SEPARATOR: &str = "\n\n";

/// The name the chat template is registered under; no extension, so no auto-escaping.
const TEMPLATE_NAME: &str = "chat_template";

/// Why a tokenizer could not be loaded or could not process an input.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// A file could not be read (missing, unreadable, not UTF-8).
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What the file system said.
        #[source]
        source: io::Error,
    },
    /// A file was read but its content is not what it should be.
    #[error("{path} is not valid: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong, naming the field.
        reason: String,
    },
    /// `tokenizers` rejected `tokenizer.json`.
    #[error("cannot load the tokenizer from {path}")]
    Load {
        /// The file.
        path: PathBuf,
        /// What `tokenizers` said.
        #[source]
        source: tokenizers::Error,
    },
    /// The chat template does not compile, or fails on a one-turn plain-text prompt (it calls
    /// what is not available, say), so it would fail on every event.
    #[error("the chat template in {path} does not compile or cannot render a one-turn prompt")]
    BadTemplate {
        /// The file holding the template.
        path: PathBuf,
        /// What the template engine said, with the line.
        #[source]
        source: minijinja::Error,
    },
    /// The chat template failed on this input: it raised, or called what is not available.
    #[error("the chat template in {path} failed to render this prompt")]
    Render {
        /// The file holding the template.
        path: PathBuf,
        /// What the template engine said.
        #[source]
        source: minijinja::Error,
    },
    /// `tokenizers` failed to encode a text.
    #[error("cannot encode text")]
    Encode(#[source] tokenizers::Error),
    /// `tokenizers` failed to decode ids, say one past the vocabulary.
    #[error("cannot decode ids")]
    Decode(#[source] tokenizers::Error),
}

impl TokenizerError {
    /// Whether the input is at fault rather than the model folder: the event should be
    /// rejected and the daemon go on. Every other error means the folder needs fixing.
    pub fn is_input_error(&self) -> bool {
        matches!(
            self,
            TokenizerError::Render { .. } | TokenizerError::Encode(_) | TokenizerError::Decode(_)
        )
    }
}

/// The policy's tokenizer with its chat template and special ids.
///
/// Cheap to share: every method takes `&self`, and the type is `Send + Sync`, so one
/// instance behind an `Arc` serves all ingest workers.
pub struct PolicyTokenizer {
    tokenizer: Tokenizer,
    template: Option<ChatTemplate>,
    special_tokens: BTreeMap<&'static str, String>,
    eos_ids: Vec<u32>,
    eos_id: u32,
    pad_id: u32,
}

/// A compiled chat template and the file it came from, for error messages.
struct ChatTemplate {
    env: Environment<'static>,
    path: PathBuf,
}

impl fmt::Debug for PolicyTokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PolicyTokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("chat_template", &self.template.as_ref().map(|t| &t.path))
            .field("eos_ids", &self.eos_ids)
            .field("eos_id", &self.eos_id)
            .field("pad_id", &self.pad_id)
            .finish()
    }
}

impl PolicyTokenizer {
    /// Loads the tokenizer from a Hugging Face model folder (see the module docs for the
    /// files).
    ///
    /// The stop ids are `generation_config.json`'s `eos_token_id` (an id or a list), followed
    /// by `tokenizer_config.json`'s `eos_token` when the list lacks it, since serving stacks
    /// such as vLLM stop on both; the folder must name at least one. The pad id is
    /// `tokenizer_config.json`'s `pad_token`, else `generation_config.json`'s `pad_token_id`,
    /// else [`eos_id`](Self::eos_id).
    ///
    /// Without any chat template, a prompt is its turns' contents joined by
    /// [`TURN_SEPARATOR`], with no role markers: fit for base models only.
    pub fn from_dir(dir: &Path) -> Result<Self, TokenizerError> {
        let tokenizer_path = dir.join(TOKENIZER_FILE);
        let bytes = read(&tokenizer_path)?;
        let tokenizer = Tokenizer::from_bytes(bytes).map_err(|source| TokenizerError::Load {
            path: tokenizer_path,
            source,
        })?;

        let config_path = dir.join(TOKENIZER_CONFIG_FILE);
        let config: TokenizerConfig = read_json(&config_path)?;
        let generation_path = dir.join(GENERATION_CONFIG_FILE);
        let generation: GenerationConfig = match read_optional(&generation_path)? {
            Some(text) => parse_json(&generation_path, &text)?,
            None => GenerationConfig::default(),
        };

        let ids = SpecialIds::resolve(&tokenizer, &config, &config_path, &generation, dir)?;
        check_ids_in_vocab(&tokenizer, &ids, &generation_path)?;
        let template = load_template(dir, &config, &config_path)?;
        let policy = PolicyTokenizer {
            special_tokens: config.special_tokens(),
            tokenizer,
            template,
            eos_ids: ids.eos_ids,
            eos_id: ids.eos_id,
            pad_id: ids.pad_id,
        };
        policy.check_template()?;
        Ok(policy)
    }

    /// Renders `prompt` with the chat template, `add_generation_prompt` set, and encodes it
    /// without adding special tokens again: the template already wrote them.
    ///
    /// A plain-text prompt is one `user` turn.
    pub fn encode_prompt(&self, prompt: &Content) -> Result<Vec<u32>, TokenizerError> {
        let text = self.render_prompt(prompt)?;
        self.encode_text(&text)
    }

    /// Encodes a response on its own: no template, no special tokens added, no EOS (the
    /// trainer appends [`eos_id`](Self::eos_id)).
    ///
    /// A response given as turns is their contents joined by [`TURN_SEPARATOR`]; the roles
    /// are dropped, since the whole response is what the policy would write after the
    /// assistant header.
    pub fn encode_response(&self, response: &Content) -> Result<Vec<u32>, TokenizerError> {
        match response {
            Content::Text(text) => self.encode_text(text),
            Content::Messages(turns) => self.encode_text(&joined(turns)),
        }
    }

    /// The prompt as the chat template writes it, before encoding; for tests and debugging.
    pub fn render_prompt(&self, prompt: &Content) -> Result<String, TokenizerError> {
        match prompt {
            Content::Text(text) => self.render_messages(&[Message {
                role: "user",
                content: text,
            }]),
            Content::Messages(turns) => self.render_turns(turns),
        }
    }

    /// The ids that end generation: see [`from_dir`](Self::from_dir) for where they come
    /// from. Never empty.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// The id appended after a response: `tokenizer_config.json`'s `eos_token`, as TRL
    /// appends `tokenizer.eos_token_id`, else the first of [`eos_ids`](Self::eos_ids).
    ///
    /// It differs from the first stop id in models such as Llama 3 Instruct, whose turns end
    /// in `<|eot_id|>` while `<|end_of_text|>` comes first in `generation_config.json`.
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// The id padding batches; see [`from_dir`](Self::from_dir) for where it comes from.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// The number of ids the tokenizer can produce, added tokens included.
    ///
    /// The model's embedding may be larger (padded to a multiple), never smaller.
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// Decodes ids to text, special tokens included.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        self.tokenizer
            .decode(ids, false)
            .map_err(TokenizerError::Decode)
    }

    /// Renders a one-turn prompt, so a template that fails on every input fails at load, as
    /// the folder's fault, rather than reject every event.
    fn check_template(&self) -> Result<(), TokenizerError> {
        match self.render_prompt(&Content::Text("Hello.".to_owned())) {
            Err(TokenizerError::Render { path, source }) => {
                Err(TokenizerError::BadTemplate { path, source })
            }
            other => other.map(drop),
        }
    }

    fn render_turns(&self, turns: &[Turn]) -> Result<String, TokenizerError> {
        let messages: Vec<Message<'_>> = turns
            .iter()
            .map(|turn| Message {
                role: turn.role.as_str(),
                content: &turn.content,
            })
            .collect();
        self.render_messages(&messages)
    }

    fn render_messages(&self, messages: &[Message<'_>]) -> Result<String, TokenizerError> {
        let Some(template) = &self.template else {
            let contents: Vec<&str> = messages.iter().map(|m| m.content).collect();
            return Ok(contents.join(TURN_SEPARATOR));
        };

        // The variables `transformers` passes: its special tokens map (set tokens only, so
        // `is defined` tests agree), the messages, no tools, no documents, and the flag.
        let mut context: BTreeMap<String, Value> = self
            .special_tokens
            .iter()
            .map(|(name, token)| (name.to_string(), Value::from(token.as_str())))
            .collect();
        let messages = messages
            .iter()
            .map(|m| context! { role => m.role, content => m.content });
        context.insert("messages".into(), Value::from_iter(messages));
        context.insert("tools".into(), Value::from(()));
        context.insert("documents".into(), Value::from(()));
        context.insert("add_generation_prompt".into(), Value::from(true));

        let render_error = |source| TokenizerError::Render {
            path: template.path.clone(),
            source,
        };
        let compiled = template
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(render_error)?;
        compiled.render(Value::from(context)).map_err(render_error)
    }

    fn encode_text(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let encoding = self
            .tokenizer
            .encode_fast(text, false)
            .map_err(TokenizerError::Encode)?;
        Ok(encoding.get_ids().to_vec())
    }
}

/// One chat turn as the template sees it: `message['role']`, `message['content']`.
struct Message<'a> {
    role: &'a str,
    content: &'a str,
}

fn joined(turns: &[Turn]) -> String {
    let contents: Vec<&str> = turns.iter().map(|turn| turn.content.as_str()).collect();
    contents.join(TURN_SEPARATOR)
}

/// The fields of `tokenizer_config.json` rebeld uses; the others are ignored.
#[derive(Debug, Default, Deserialize)]
struct TokenizerConfig {
    #[serde(default)]
    chat_template: Option<TemplateSource>,
    #[serde(default)]
    bos_token: Option<SpecialToken>,
    #[serde(default)]
    eos_token: Option<SpecialToken>,
    #[serde(default)]
    pad_token: Option<SpecialToken>,
    #[serde(default)]
    unk_token: Option<SpecialToken>,
}

impl TokenizerConfig {
    /// The special tokens `transformers` hands the template, by variable name.
    fn special_tokens(&self) -> BTreeMap<&'static str, String> {
        let named = [
            ("bos_token", &self.bos_token),
            ("eos_token", &self.eos_token),
            ("pad_token", &self.pad_token),
            ("unk_token", &self.unk_token),
        ];
        named
            .into_iter()
            .filter_map(|(name, token)| Some((name, token.as_ref()?.content().to_owned())))
            .collect()
    }
}

/// A chat template: one string, or named templates of which rebeld uses `default`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum TemplateSource {
    Single(String),
    Named(Vec<NamedTemplate>),
}

#[derive(Debug, Deserialize)]
struct NamedTemplate {
    name: String,
    template: String,
}

/// A special token as `transformers` writes it: the text, or an `AddedToken` object.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum SpecialToken {
    Text(String),
    Added { content: String },
}

impl SpecialToken {
    fn content(&self) -> &str {
        match self {
            SpecialToken::Text(text) => text,
            SpecialToken::Added { content } => content,
        }
    }
}

/// The fields of `generation_config.json` rebeld uses; the others are ignored.
#[derive(Debug, Default, Deserialize)]
struct GenerationConfig {
    #[serde(default)]
    eos_token_id: Option<OneOrMany>,
    #[serde(default)]
    pad_token_id: Option<u32>,
}

/// `eos_token_id` is an id in some models and a list of ids in others.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

/// The special ids, resolved from both configuration files.
struct SpecialIds {
    eos_ids: Vec<u32>,
    eos_id: u32,
    pad_id: u32,
}

impl SpecialIds {
    fn resolve(
        tokenizer: &Tokenizer,
        config: &TokenizerConfig,
        config_path: &Path,
        generation: &GenerationConfig,
        dir: &Path,
    ) -> Result<Self, TokenizerError> {
        let token_id = |field: &str, token: &Option<SpecialToken>| {
            token
                .as_ref()
                .map(|token| id_of(tokenizer, config_path, field, token.content()))
                .transpose()
        };
        let config_eos = token_id("eos_token", &config.eos_token)?;
        let config_pad = token_id("pad_token", &config.pad_token)?;

        let mut eos_ids = match &generation.eos_token_id {
            Some(OneOrMany::One(id)) => vec![*id],
            Some(OneOrMany::Many(ids)) => ids.clone(),
            None => Vec::new(),
        };
        if let Some(id) = config_eos.filter(|id| !eos_ids.contains(id)) {
            eos_ids.push(id);
        }
        let Some(&first_eos) = eos_ids.first() else {
            return Err(TokenizerError::Invalid {
                path: dir.to_owned(),
                reason: format!(
                    "no EOS token: neither {GENERATION_CONFIG_FILE} has `eos_token_id` nor \
                     {TOKENIZER_CONFIG_FILE} has `eos_token`"
                ),
            });
        };

        let eos_id = config_eos.unwrap_or(first_eos);
        let pad_id = config_pad.or(generation.pad_token_id).unwrap_or(eos_id);
        Ok(SpecialIds {
            eos_ids,
            eos_id,
            pad_id,
        })
    }
}

fn id_of(
    tokenizer: &Tokenizer,
    path: &Path,
    field: &str,
    token: &str,
) -> Result<u32, TokenizerError> {
    tokenizer
        .token_to_id(token)
        .ok_or_else(|| TokenizerError::Invalid {
            path: path.to_owned(),
            reason: format!("`{field}` {token:?} is not in the vocabulary of {TOKENIZER_FILE}"),
        })
}

/// Ids from `generation_config.json` are numbers, so they may lie past the vocabulary.
fn check_ids_in_vocab(
    tokenizer: &Tokenizer,
    ids: &SpecialIds,
    generation_path: &Path,
) -> Result<(), TokenizerError> {
    let vocab_size = tokenizer.get_vocab_size(true);
    let outside = ids
        .eos_ids
        .iter()
        .chain([&ids.pad_id])
        .find(|&&id| id as usize >= vocab_size);
    match outside {
        Some(id) => Err(TokenizerError::Invalid {
            path: generation_path.to_owned(),
            reason: format!("token id {id} is outside the vocabulary of {vocab_size} ids"),
        }),
        None => Ok(()),
    }
}

/// Finds and compiles the chat template: `chat_template.jinja` first, as in `transformers`.
fn load_template(
    dir: &Path,
    config: &TokenizerConfig,
    config_path: &Path,
) -> Result<Option<ChatTemplate>, TokenizerError> {
    let file_path = dir.join(CHAT_TEMPLATE_FILE);
    let (source, path) = match (read_optional(&file_path)?, &config.chat_template) {
        (Some(source), _) => (source, file_path),
        (None, Some(TemplateSource::Single(source))) => (source.clone(), config_path.to_owned()),
        (None, Some(TemplateSource::Named(named))) => {
            let default = named.iter().find(|t| t.name == "default").ok_or_else(|| {
                TokenizerError::Invalid {
                    path: config_path.to_owned(),
                    reason: "`chat_template` lists named templates but none named `default`"
                        .to_owned(),
                }
            })?;
            (default.template.clone(), config_path.to_owned())
        }
        (None, None) => return Ok(None),
    };

    let env = template_environment(source).map_err(|source| TokenizerError::BadTemplate {
        path: path.clone(),
        source,
    })?;
    Ok(Some(ChatTemplate { env, path }))
}

/// A Jinja environment configured as `transformers` configures its own.
fn template_environment(source: String) -> Result<Environment<'static>, minijinja::Error> {
    let syntax = SyntaxConfig::builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .build()?;
    let mut env = Environment::new();
    env.set_syntax(syntax);
    env.set_auto_escape_callback(|_| AutoEscape::None);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", raise_exception);
    env.add_template_owned(TEMPLATE_NAME, source)?;
    Ok(env)
}

/// `raise_exception(message)`, which `transformers` offers templates to reject a conversation.
fn raise_exception(message: String) -> Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
}

fn read(path: &Path) -> Result<String, TokenizerError> {
    fs::read_to_string(path).map_err(|source| TokenizerError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Reads a file that may be absent; any other failure is an error.
fn read_optional(path: &Path) -> Result<Option<String>, TokenizerError> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(TokenizerError::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, TokenizerError> {
    parse_json(path, &read(path)?)
}

fn parse_json<T: serde::de::DeserializeOwned>(
    path: &Path,
    text: &str,
) -> Result<T, TokenizerError> {
    serde_json::from_str(text).map_err(|error| TokenizerError::Invalid {
        path: path.to_owned(),
        reason: error.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Role;

    use serde_json::Value as Json;

    /// Made by `tests/fixtures/make_tiny_llama.py`, with the reference ids beside it.
    fn fixture_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama")
    }

    fn fixture() -> PolicyTokenizer {
        PolicyTokenizer::from_dir(&fixture_dir()).expect("fixture tokenizer loads")
    }

    /// `tokenizer_reference.json`: what `transformers` made of the same folder.
    fn reference() -> Json {
        let text = fs::read_to_string(fixture_dir().join("tokenizer_reference.json"))
            .expect("reference file");
        serde_json::from_str(&text).expect("reference JSON")
    }

    fn content(json: &Json) -> Content {
        match json {
            Json::String(text) => Content::Text(text.clone()),
            Json::Array(turns) => Content::Messages(turns.iter().map(turn).collect()),
            other => panic!("not a content: {other}"),
        }
    }

    fn turn(json: &Json) -> Turn {
        Turn {
            role: Role::parse(json["role"].as_str().expect("role")).expect("known role"),
            content: json["content"].as_str().expect("content").to_owned(),
        }
    }

    fn ids(json: &Json) -> Vec<u32> {
        serde_json::from_value(json.clone()).expect("ids")
    }

    /// A copy of the fixture's tokenizer files in a temporary folder, with `edits` applied:
    /// `(file, Some(text))` writes a file, `(file, None)` removes it.
    fn edited_fixture(edits: &[(&str, Option<&str>)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("temporary folder");
        let files = [
            TOKENIZER_FILE,
            TOKENIZER_CONFIG_FILE,
            GENERATION_CONFIG_FILE,
        ];
        for file in files {
            fs::copy(fixture_dir().join(file), dir.path().join(file)).expect("copy");
        }
        for (file, text) in edits {
            let path = dir.path().join(file);
            match text {
                Some(text) => fs::write(path, text).expect("write"),
                None => fs::remove_file(path).expect("remove"),
            }
        }
        dir
    }

    /// The fixture's `tokenizer_config.json` with `chat_template` replaced or removed.
    fn config_with_template(template: Option<&str>) -> String {
        let path = fixture_dir().join(TOKENIZER_CONFIG_FILE);
        let mut config: Json =
            serde_json::from_str(&fs::read_to_string(path).expect("config")).expect("JSON");
        let fields = config.as_object_mut().expect("object");
        match template {
            Some(template) => fields.insert("chat_template".into(), template.into()),
            None => fields.remove("chat_template"),
        };
        config.to_string()
    }

    fn load_error(edits: &[(&str, Option<&str>)]) -> TokenizerError {
        let dir = edited_fixture(edits);
        PolicyTokenizer::from_dir(dir.path()).expect_err("load fails")
    }

    fn user(text: &str) -> Content {
        Content::Text(text.to_owned())
    }

    #[test]
    fn prompts_render_and_encode_as_in_transformers() {
        let tokenizer = fixture();

        for case in reference()["prompts"].as_array().expect("prompts") {
            let name = &case["name"];
            let prompt = content(&case["content"]);
            let rendered = tokenizer.render_prompt(&prompt).expect("render");
            assert_eq!(rendered, case["rendered"].as_str().expect("text"), "{name}");
            let encoded = tokenizer.encode_prompt(&prompt).expect("encode");
            assert_eq!(encoded, ids(&case["ids"]), "{name}");
        }
    }

    #[test]
    fn responses_encode_as_in_transformers_and_decode_back() {
        let tokenizer = fixture();

        for case in reference()["responses"].as_array().expect("responses") {
            let name = &case["name"];
            let encoded = tokenizer
                .encode_response(&content(&case["content"]))
                .expect("encode");
            assert_eq!(encoded, ids(&case["ids"]), "{name}");
            let decoded = tokenizer.decode(&encoded).expect("decode");
            assert_eq!(decoded, case["text"].as_str().expect("text"), "{name}");
        }
    }

    #[test]
    fn special_ids_and_vocabulary_match_transformers() {
        let tokenizer = fixture();
        let reference = reference();

        assert_eq!(tokenizer.eos_ids(), ids(&reference["eos_token_ids"]));
        assert_eq!(
            Some(u64::from(tokenizer.pad_id())),
            reference["pad_token_id"].as_u64()
        );
        assert_eq!(
            Some(tokenizer.vocab_size() as u64),
            reference["vocab_size"].as_u64()
        );
        assert_eq!(tokenizer.eos_id(), 0); // <|endoftext|>, tokenizer_config's eos_token
    }

    #[test]
    fn list_valued_eos_token_id_is_kept_in_order_and_completed() {
        let generation = r#"{"eos_token_id": [2, 1], "pad_token_id": null}"#;
        let dir = edited_fixture(&[(GENERATION_CONFIG_FILE, Some(generation))]);
        let tokenizer = PolicyTokenizer::from_dir(dir.path()).expect("load");

        assert_eq!(tokenizer.eos_ids(), [2, 1, 0]);
        assert_eq!(tokenizer.eos_id(), 0);
    }

    #[test]
    fn int_valued_eos_token_id_is_read() {
        let generation = r#"{"eos_token_id": 2, "pad_token_id": 1}"#;
        let config = r#"{"chat_template": null}"#; // no eos_token, no pad_token
        let dir = edited_fixture(&[
            (GENERATION_CONFIG_FILE, Some(generation)),
            (TOKENIZER_CONFIG_FILE, Some(config)),
        ]);
        let tokenizer = PolicyTokenizer::from_dir(dir.path()).expect("load");

        assert_eq!(tokenizer.eos_ids(), [2]);
        assert_eq!(tokenizer.eos_id(), 2);
        assert_eq!(tokenizer.pad_id(), 1);
    }

    #[test]
    fn without_generation_config_eos_and_pad_come_from_tokenizer_config() {
        let config = r#"{"eos_token": {"__type": "AddedToken", "content": "<|im_end|>",
            "lstrip": false}}"#;
        let dir = edited_fixture(&[
            (GENERATION_CONFIG_FILE, None),
            (TOKENIZER_CONFIG_FILE, Some(config)),
        ]);
        let tokenizer = PolicyTokenizer::from_dir(dir.path()).expect("load");

        assert_eq!(tokenizer.eos_ids(), [2]);
        assert_eq!(tokenizer.pad_id(), 2);
    }

    #[test]
    fn missing_required_files_are_named() {
        for file in [TOKENIZER_FILE, TOKENIZER_CONFIG_FILE] {
            let error = load_error(&[(file, None)]);

            assert!(matches!(error, TokenizerError::Read { .. }), "{error:?}");
            assert!(error.to_string().ends_with(file), "{error}");
            assert!(!error.is_input_error());
        }
    }

    #[test]
    fn malformed_files_are_named() {
        for file in [
            TOKENIZER_FILE,
            TOKENIZER_CONFIG_FILE,
            GENERATION_CONFIG_FILE,
        ] {
            let error = load_error(&[(file, Some("{not json"))]);

            assert!(error.to_string().contains(file), "{error}");
        }
    }

    #[test]
    fn folder_without_any_eos_is_rejected() {
        let error = load_error(&[
            (GENERATION_CONFIG_FILE, Some("{}")),
            (TOKENIZER_CONFIG_FILE, Some("{}")),
        ]);

        assert!(error.to_string().contains("no EOS token"), "{error}");
    }

    #[test]
    fn special_tokens_outside_the_vocabulary_are_rejected() {
        let unknown = load_error(&[(TOKENIZER_CONFIG_FILE, Some(r#"{"pad_token": "<pad>"}"#))]);
        let too_large = load_error(&[(GENERATION_CONFIG_FILE, Some(r#"{"eos_token_id": 512}"#))]);

        assert!(
            unknown.to_string().contains(TOKENIZER_CONFIG_FILE),
            "{unknown}"
        );
        assert!(unknown.to_string().contains("<pad>"), "{unknown}");
        assert!(
            too_large.to_string().contains(GENERATION_CONFIG_FILE),
            "{too_large}"
        );
        assert!(too_large.to_string().contains("512"), "{too_large}");
    }

    #[test]
    fn chat_template_file_takes_precedence_over_tokenizer_config() {
        let template = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}";
        let dir = edited_fixture(&[(CHAT_TEMPLATE_FILE, Some(template))]);
        let tokenizer = PolicyTokenizer::from_dir(dir.path()).expect("load");

        assert_eq!(
            tokenizer.render_prompt(&user("Hi")).expect("render"),
            "[user] Hi\n"
        );
    }

    #[test]
    fn named_templates_use_the_default_one() {
        let config = r#"{"eos_token": "<|endoftext|>", "chat_template": [
            {"name": "tool_use", "template": "tools"},
            {"name": "default", "template": "{{ messages[0].content }}"}]}"#;
        let dir = edited_fixture(&[(TOKENIZER_CONFIG_FILE, Some(config))]);
        let tokenizer = PolicyTokenizer::from_dir(dir.path()).expect("load");

        assert_eq!(tokenizer.render_prompt(&user("Hi")).expect("render"), "Hi");
    }

    #[test]
    fn without_a_chat_template_turns_are_joined_as_plain_text() {
        let config = config_with_template(None);
        let dir = edited_fixture(&[(TOKENIZER_CONFIG_FILE, Some(&config))]);
        let tokenizer = PolicyTokenizer::from_dir(dir.path()).expect("load");
        let turns = Content::Messages(vec![
            Turn {
                role: Role::System,
                content: "Be brief.".into(),
            },
            Turn {
                role: Role::User,
                content: "Hi".into(),
            },
        ]);

        assert_eq!(
            tokenizer.render_prompt(&turns).expect("render"),
            "Be brief.\n\nHi"
        );
        assert_eq!(
            tokenizer.render_prompt(&user("Hi ")).expect("render"),
            "Hi "
        );
    }

    #[test]
    fn template_syntax_errors_name_the_file() {
        let config = config_with_template(Some("{% for m in messages %}"));
        let error = load_error(&[(TOKENIZER_CONFIG_FILE, Some(&config))]);

        assert!(
            matches!(error, TokenizerError::BadTemplate { .. }),
            "{error:?}"
        );
        assert!(error.to_string().contains(TOKENIZER_CONFIG_FILE), "{error}");
    }

    #[test]
    fn templates_failing_on_every_prompt_are_rejected_at_load() {
        let template = "{{ strftime_now('%d %b %Y') }}{{ messages[0].content }}";
        let error = load_error(&[(CHAT_TEMPLATE_FILE, Some(template))]);

        assert!(
            matches!(error, TokenizerError::BadTemplate { .. }),
            "{error:?}"
        );
        assert!(error.to_string().contains(CHAT_TEMPLATE_FILE), "{error}");
        assert!(!error.is_input_error());
    }

    #[test]
    fn raise_exception_rejects_the_input_not_the_folder() {
        let template = "{% if messages[0].role == 'system' %}\
            {{ raise_exception('System role not supported') }}{% endif %}ok";
        let config = config_with_template(Some(template));
        let dir = edited_fixture(&[(TOKENIZER_CONFIG_FILE, Some(&config))]);
        let tokenizer = PolicyTokenizer::from_dir(dir.path()).expect("load");
        let system = Content::Messages(vec![Turn {
            role: Role::System,
            content: "Be brief.".into(),
        }]);

        assert_eq!(tokenizer.render_prompt(&user("Hi")).expect("render"), "ok");
        let error = tokenizer.encode_prompt(&system).expect_err("raises");
        assert!(error.is_input_error());
        let source = std::error::Error::source(&error).map(ToString::to_string);
        assert!(source.is_some_and(|s| s.contains("System role not supported")));
    }

    /// Templates written for Jinja2 call Python string methods and loop controls, and read
    /// the variables `transformers` passes. The expected text is what `transformers` 5.25's
    /// `apply_chat_template(..., chat_template=template, tokenize=False)` renders with the
    /// fixture.
    #[test]
    fn python_methods_loop_controls_and_special_tokens_are_available() {
        let template = "{{ eos_token }}{% if bos_token is defined %}bos{% endif %}\
            {% if tools is none and documents is none %}-{% endif %}\
            {% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}\
            {{ m['content'].strip().upper() }}{% endfor %}";
        let config = config_with_template(Some(template));
        let dir = edited_fixture(&[(TOKENIZER_CONFIG_FILE, Some(&config))]);
        let tokenizer = PolicyTokenizer::from_dir(dir.path()).expect("load");
        let turns = Content::Messages(vec![
            Turn {
                role: Role::User,
                content: "  hi  ".into(),
            },
            Turn {
                role: Role::Assistant,
                content: "never".into(),
            },
        ]);

        let rendered = tokenizer.render_prompt(&turns).expect("render");
        assert_eq!(rendered, "<|endoftext|>-HI");
    }

    #[test]
    fn shareable_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<PolicyTokenizer>();
        assert_send_sync::<TokenizerError>();
    }
}
