//! Text to token ids and back, with a Hugging Face `tokenizer.json` (or one built from a
//! GGUF file's metadata), and the model's chat template.

use std::path::Path;

use crate::chat::ChatTemplate;
use crate::{Error, Result};

/// A loaded tokenizer, the model's special ids and its chat template.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Prepended to every prompt when the model wants one (and the prompt does not
    /// already start with it, as a rendered chat template may).
    pub bos: Option<u32>,
    /// How `/v1/chat/completions` turns messages into a prompt.
    pub chat: ChatTemplate,
}

fn tok_error(context: &str) -> impl Fn(tokenizers::Error) -> Error + '_ {
    move |e| Error::Tokenizer(format!("{context}: {e}"))
}

impl Tokenizer {
    pub fn load(path: &Path, bos: Option<u32>) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path).map_err(tok_error(&path.display().to_string()))?;
        Ok(Self { inner, bos, chat: ChatTemplate::builtin() })
    }

    /// A tokenizer with the built-in chat format.
    pub fn from_inner(inner: tokenizers::Tokenizer, bos: Option<u32>) -> Self {
        Self { inner, bos, chat: ChatTemplate::builtin() }
    }

    /// The same tokenizer with the model's own chat template.
    pub fn with_chat(self, chat: ChatTemplate) -> Self {
        Self { chat, ..self }
    }

    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// The ids of a prompt, after the beginning-of-sequence token when the model has one.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode_fast(text, false).map_err(tok_error("encoding"))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if enc.get_ids().first() != self.bos.as_ref() {
            ids.extend(self.bos);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// The ids of a text, without special tokens.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.inner.encode_fast(text, false).map_err(tok_error("encoding"))?.get_ids().to_vec())
    }

    /// Text of generated ids, special tokens left out.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(tok_error("decoding"))
    }

    /// The text of one token, special tokens spelled out (log-probabilities show these).
    pub fn piece(&self, id: u32) -> String {
        self.inner.decode(&[id], false).unwrap_or_default()
    }

    /// The text of one token as the vocabulary spells it (`None` past its end).
    pub fn token_text(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

/// Turns generated ids into text as they come, for streaming: byte-level tokens can end
/// in the middle of a UTF-8 character, so text is released only up to the last complete
/// character.
#[derive(Default)]
pub struct TextStream {
    ids: Vec<u32>,
    /// The decoded text of `ids`.
    text: String,
    /// Bytes of it already released.
    sent: usize,
}

impl TextStream {
    /// Adds one id and returns the text it completes (possibly empty).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        self.text = tok.decode(&self.ids)?;
        if self.text.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        let Some(new) = self.text.get(self.sent..) else { return Ok(String::new()) };
        let new = new.to_owned();
        self.sent = self.text.len();
        Ok(new)
    }

    /// Everything decoded so far (a trailing half character shows as U+FFFD).
    pub fn text(&self) -> &str {
        &self.text
    }
}
