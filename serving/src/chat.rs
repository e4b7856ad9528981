//! Chat templates: the Jinja template a model ships (`chat_template` in a GGUF file's
//! metadata or a Hugging Face `tokenizer_config.json`), rendered with minijinja the way
//! Hugging Face's `apply_chat_template` renders it: `messages`, `add_generation_prompt`,
//! `bos_token`, `eos_token` and `raise_exception` in scope, Python string methods
//! (`.strip()`, `.startswith()`, ...) available.

use minijinja::{Environment, ErrorKind, context};
use serde::Serialize;

use crate::{Error, Result};

/// One message of a conversation.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// The format of the built-in model, which has no template of its own: one
/// `Role: content` line per message, then `Assistant:`.
const BUILTIN: &str = "{%- for m in messages -%}
{%- if m.role == 'system' or m.role == 'developer' %}System{% elif m.role == 'assistant' %}Assistant{% elif m.role == 'tool' %}Tool{% else %}User{% endif %}: {{ m.content | trim }}
{% endfor -%}
{%- if add_generation_prompt %}Assistant:{% endif -%}";

/// A compiled chat template and the strings that end an assistant's turn in text (the
/// end-of-turn *token* is the tokenizer's end-of-sequence id).
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
    /// Stop strings the template's turns need (the built-in format has no end-of-turn
    /// token, so a turn ends where the next `User:` line starts).
    pub stop: Vec<String>,
    /// The template's source.
    pub source: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").field("source", &self.source).field("stop", &self.stop).finish()
    }
}

fn raise_exception(message: String) -> std::result::Result<String, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
}

impl ChatTemplate {
    /// Compiles a template; `bos_token` and `eos_token` are the texts of those tokens.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self> {
        let mut env = Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        // Hugging Face renders with trim_blocks and lstrip_blocks on.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_template_owned("chat", source.to_owned()).map_err(|e| Error::Tokenizer(format!("chat template: {e}")))?;
        Ok(Self { env, bos_token: bos_token.to_owned(), eos_token: eos_token.to_owned(), stop: Vec::new(), source: source.to_owned() })
    }

    /// The built-in model's format (see [`BUILTIN`]), which stops before the next `User:`.
    pub fn builtin() -> Self {
        let mut t = Self::new(BUILTIN, "", "").expect("the built-in template compiles (checked by a test)");
        t.stop = vec!["\nUser:".to_owned()];
        t
    }

    /// The prompt for `messages`, ending in the assistant's turn when
    /// `add_generation_prompt`. A template that refuses the conversation (wrong role
    /// order, say) gives [`Error::Chat`] with its message.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let template = self.env.get_template("chat").map_err(|e| Error::Chat(e.to_string()))?;
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token,
                eos_token => self.eos_token,
            })
            .map_err(|e| Error::Chat(match e.kind() {
                ErrorKind::InvalidOperation => e.detail().unwrap_or("the chat template refused the conversation").to_owned(),
                _ => format!("the chat template failed: {e}"),
            }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: &str, content: &str) -> ChatMessage {
        ChatMessage { role: role.into(), content: content.into() }
    }

    #[test]
    fn builtin_format() {
        let t = ChatTemplate::builtin();
        let text = t.render(&[msg("system", "Be brief."), msg("user", " hi "), msg("assistant", "hello"), msg("user", "bye")], true).unwrap();
        assert_eq!(text, "System: Be brief.\nUser: hi\nAssistant: hello\nUser: bye\nAssistant:");
        assert_eq!(t.stop, vec!["\nUser:"]);
    }

    #[test]
    fn hugging_face_conventions() {
        let source = "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' and loop.index0 % 2 == 1 %}{{ raise_exception('Conversation roles must alternate') }}{% endif %}\n  [{{ m['role'].upper() }}] {{ m['content'].strip() }}{{ eos_token }}\n{% endfor %}";
        let t = ChatTemplate::new(source, "<s>", "</s>").unwrap();
        // What Jinja2 renders with trim_blocks and lstrip_blocks (checked against Python).
        assert_eq!(t.render(&[msg("user", " a ")], false).unwrap(), "<s>  [USER] a</s>\n");
        match t.render(&[msg("assistant", "x"), msg("user", "y")], false) {
            Err(Error::Chat(m)) => assert_eq!(m, "Conversation roles must alternate"),
            other => panic!("expected the template's refusal, got {other:?}"),
        }
        assert!(ChatTemplate::new("{% for %}", "", "").is_err());
    }
}
