//! Kafka topic names: the one rule for which names Kafka accepts, applied to the fixed topics at
//! start and to every rendered topic before it is sent, and the topic template
//! (`outbox.event.{aggregatetype}`), parsed once into literal pieces and field names.

/// Kafka's longest topic name (its own limit, so that partition directories stay under 255).
pub const MAX_LEN: usize = 249;

/// What makes a name one Kafka refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    /// No characters at all.
    #[error("it is empty")]
    Empty,
    /// More than [`MAX_LEN`] bytes.
    #[error("it has {0} characters")]
    TooLong(usize),
    /// `.` and `..` would be directory names.
    #[error("it is only dots")]
    Dots,
    /// A character outside `[a-zA-Z0-9._-]`.
    #[error("it contains {0:?}")]
    Char(char),
}

/// A topic name Kafka would refuse, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{name:?} is not a legal Kafka topic name: {problem} (Kafka accepts 1 to 249 ASCII letters, digits, '.', '_' and '-')")]
pub struct IllegalName {
    /// The name as given.
    pub name: String,
    /// What is wrong with it.
    pub problem: Problem,
}

fn legal_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')
}

/// The first character Kafka does not accept in a topic name, if any.
fn illegal_char(s: &str) -> Option<char> {
    s.chars().find(|c| !c.is_ascii() || !legal_char(*c as u8))
}

/// Whether Kafka accepts `name` as a topic name. Cheap on the legal path: it runs for every
/// record whose topic comes from a template.
pub fn legal(name: &str) -> Result<(), Problem> {
    if name.is_empty() {
        return Err(Problem::Empty);
    }
    if !name.bytes().all(legal_char) {
        return Err(Problem::Char(illegal_char(name).unwrap_or('?')));
    }
    if name.len() > MAX_LEN {
        return Err(Problem::TooLong(name.len()));
    }
    if name == "." || name == ".." {
        return Err(Problem::Dots);
    }
    Ok(())
}

/// [`legal`], with the name in the error.
pub fn check(name: &str) -> Result<(), IllegalName> {
    legal(name).map_err(|problem| IllegalName {
        name: name.to_owned(),
        problem,
    })
}

/// A piece of a topic template.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Piece<'t> {
    /// Text copied as is.
    Literal(&'t str),
    /// `{name}`: the value of that column (or envelope field).
    Field(&'t str),
}

/// A parsed topic template: literal pieces and field names, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template<'t> {
    pieces: Vec<Piece<'t>>,
}

/// Why a topic template is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// A `{` without its `}`, a `}` without its `{`, `{}` or `{a{b}`.
    #[error("topic template {template:?} has unbalanced or empty braces; write e.g. \"outbox.event.{{aggregatetype}}\"")]
    Braces {
        /// The template.
        template: String,
    },
    /// Its fixed text alone already makes every topic illegal.
    #[error("topic template {template:?} can never make a legal topic name: {problem} (Kafka accepts 1 to 249 ASCII letters, digits, '.', '_' and '-')")]
    Illegal {
        /// The template.
        template: String,
        /// What is wrong with its fixed text.
        problem: Problem,
    },
}

impl<'t> Template<'t> {
    /// Parses `text`; a template without fields must be a legal name itself, and the literal
    /// pieces of one with fields may use only legal characters.
    pub fn parse(text: &'t str) -> Result<Self, TemplateError> {
        let braces = || TemplateError::Braces {
            template: text.to_owned(),
        };
        let mut pieces = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find(['{', '}']) {
            if rest.as_bytes()[open] == b'}' {
                return Err(braces());
            }
            let close = rest[open..]
                .find('}')
                .map(|i| open + i)
                .ok_or_else(braces)?;
            let name = &rest[open + 1..close];
            if name.is_empty() || name.contains('{') {
                return Err(braces());
            }
            if open > 0 {
                pieces.push(Piece::Literal(&rest[..open]));
            }
            pieces.push(Piece::Field(name));
            rest = &rest[close + 1..];
        }
        if !rest.is_empty() {
            pieces.push(Piece::Literal(rest));
        }
        let template = Template { pieces };
        template.check().map_err(|problem| TemplateError::Illegal {
            template: text.to_owned(),
            problem,
        })?;
        Ok(template)
    }

    fn check(&self) -> Result<(), Problem> {
        if let Some(fixed) = self.fixed() {
            return legal(fixed);
        }
        let mut fixed_len = 0;
        for piece in &self.pieces {
            if let Piece::Literal(s) = piece {
                if let Some(c) = illegal_char(s) {
                    return Err(Problem::Char(c));
                }
                fixed_len += s.len();
            }
        }
        if fixed_len > MAX_LEN {
            return Err(Problem::TooLong(fixed_len));
        }
        Ok(())
    }

    /// The pieces, in order.
    pub fn pieces(&self) -> &[Piece<'t>] {
        &self.pieces
    }

    /// The field names in braces, in order (repeats included).
    pub fn fields(&self) -> impl Iterator<Item = &'t str> + '_ {
        self.pieces.iter().filter_map(|p| match p {
            Piece::Field(name) => Some(*name),
            Piece::Literal(_) => None,
        })
    }

    /// The fixed text before the first field (all of it when there are no fields).
    pub fn prefix(&self) -> &'t str {
        match self.pieces.first() {
            Some(Piece::Literal(s)) => s,
            Some(Piece::Field(_)) | None => "",
        }
    }

    /// The topic itself when the template has no fields (`""` for an empty template).
    pub fn fixed(&self) -> Option<&'t str> {
        match self.pieces.as_slice() {
            [] => Some(""),
            [Piece::Literal(s)] => Some(s),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kafkas_legal_names_pass_and_others_say_why() {
        for ok in [
            "orders",
            "outbox.event.Order_1-x",
            ".a",
            "...",
            &"x".repeat(249),
        ] {
            assert_eq!(legal(ok), Ok(()), "{ok:?}");
        }
        assert_eq!(legal(""), Err(Problem::Empty));
        assert_eq!(legal("."), Err(Problem::Dots));
        assert_eq!(legal(".."), Err(Problem::Dots));
        assert_eq!(legal(&"x".repeat(250)), Err(Problem::TooLong(250)));
        assert_eq!(legal("Order Created"), Err(Problem::Char(' ')));
        assert_eq!(legal("Order/Evil"), Err(Problem::Char('/')));
        assert_eq!(legal("zähler"), Err(Problem::Char('ä')));
        let err = check("a b\nc").unwrap_err().to_string();
        assert!(err.contains("\"a b\\nc\"") && err.contains("' '"), "{err}");
        assert!(!err.contains('\n'), "one line: {err:?}");
    }

    #[test]
    fn templates_split_into_literals_and_fields() {
        let t = Template::parse("{tenant}.events.{type}").unwrap();
        assert_eq!(
            t.pieces(),
            [
                Piece::Field("tenant"),
                Piece::Literal(".events."),
                Piece::Field("type")
            ]
        );
        assert_eq!(t.fields().collect::<Vec<_>>(), ["tenant", "type"]);
        assert_eq!(t.fixed(), None);
        assert_eq!(t.prefix(), "");
        assert_eq!(Template::parse("x.{type}").unwrap().prefix(), "x.");
        assert_eq!(Template::parse("orders").unwrap().fixed(), Some("orders"));
    }

    #[test]
    fn broken_braces_are_rejected() {
        for bad in ["x.{a", "x.a}", "{}", "x.{a{b}}", "}{a}", "{a}}"] {
            assert!(
                matches!(Template::parse(bad), Err(TemplateError::Braces { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn fixed_text_that_can_never_be_legal_is_rejected_at_start() {
        for (bad, problem) in [
            ("my topic", Problem::Char(' ')),
            ("events/{type}", Problem::Char('/')),
            ("", Problem::Empty),
            ("..", Problem::Dots),
        ] {
            assert_eq!(
                Template::parse(bad),
                Err(TemplateError::Illegal {
                    template: bad.into(),
                    problem
                }),
                "{bad:?}"
            );
        }
        let long = format!("{}.{{type}}", "x".repeat(249));
        assert!(matches!(
            Template::parse(&long),
            Err(TemplateError::Illegal {
                problem: Problem::TooLong(250),
                ..
            })
        ));
        // Values may still make a legal name of a template whose fixed text is only dots.
        assert!(Template::parse(".{type}").is_ok());
    }

    #[test]
    fn the_config_rejects_illegal_fixed_topics_at_start() {
        let config = |outbox: &str, kafka: &str| {
            let text = format!(
                "[postgres]\nurl = \"postgres://u@h/d\"\n[[outbox]]\ntable = \"public.outbox\"\n{outbox}\n\
                 [[message]]\nprefix = \"p\"\ntopic = \"m.{{type}}\"\n[kafka]\nbrokers = \"k:9092\"\n{kafka}\n"
            );
            crate::config::Config::parse(&text, "relay.toml", |_| None).map_err(|e| e.to_string())
        };
        assert!(config("topic = \"orders\"", "dead_letter_topic = \"dead-letters\"").is_ok());
        for (outbox, kafka, want) in [
            (
                "",
                "dead_letter_topic = \"dead letters\"",
                "[kafka] dead_letter_topic",
            ),
            (
                "",
                "delivery = \"exactly-once\"\noffsets_topic = \"offsets/x\"",
                "[kafka] offsets_topic",
            ),
            ("topic = \"order events\"", "", "[[outbox]] topic template"),
            ("topic = \"x.{a\"", "", "[[outbox]] topic template"),
        ] {
            let err = config(outbox, kafka).unwrap_err();
            assert!(err.contains(want) && !err.contains('\n'), "{err}");
        }
    }
}
