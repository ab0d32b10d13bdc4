//! config/relay.example.toml names every key with its real default, and its TLS and SASL
//! examples are accepted.

use std::cell::RefCell;
use std::collections::BTreeSet;

use crate::files::*;

/// Serde's view of `ConfigFile`: the path of every field (`postgres.url`, `outbox.table`, ...),
/// collected by deserializing from a stand-in that offers each field the struct asks for.
mod fields {
    use std::cell::RefCell;
    use std::fmt;

    use serde::de::{self, DeserializeSeed, IntoDeserializer, MapAccess, SeqAccess, Visitor};

    #[derive(Debug)]
    pub struct Error(String);

    impl fmt::Display for Error {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(&self.0)
        }
    }

    impl std::error::Error for Error {}

    impl de::Error for Error {
        fn custom<T: fmt::Display>(msg: T) -> Self {
            Error(msg.to_string())
        }
    }

    pub struct Collector<'a> {
        pub path: String,
        pub out: &'a RefCell<Vec<String>>,
    }

    fn join(path: &str, name: &str) -> String {
        if path.is_empty() {
            name.to_owned()
        } else {
            format!("{path}.{name}")
        }
    }

    macro_rules! plain {
        ($($method:ident => $visit:ident($($value:expr)?)),* $(,)?) => {
            $(fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
                visitor.$visit($($value)?)
            })*
        };
    }

    impl<'de> de::Deserializer<'de> for Collector<'_> {
        type Error = Error;

        plain! {
            deserialize_any => visit_str("x"),
            deserialize_bool => visit_bool(false),
            deserialize_i8 => visit_i8(1),
            deserialize_i16 => visit_i16(1),
            deserialize_i32 => visit_i32(1),
            deserialize_i64 => visit_i64(1),
            deserialize_u8 => visit_u8(1),
            deserialize_u16 => visit_u16(1),
            deserialize_u32 => visit_u32(1),
            deserialize_u64 => visit_u64(1),
            deserialize_f32 => visit_f32(1.0),
            deserialize_f64 => visit_f64(1.0),
            deserialize_char => visit_char('x'),
            deserialize_str => visit_str("x"),
            deserialize_string => visit_str("x"),
            deserialize_bytes => visit_bytes(b"x"),
            deserialize_byte_buf => visit_bytes(b"x"),
            deserialize_unit => visit_unit(),
            deserialize_identifier => visit_str("x"),
            deserialize_ignored_any => visit_unit(),
        }

        fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
            visitor.visit_some(self)
        }

        fn deserialize_unit_struct<V: Visitor<'de>>(
            self,
            _name: &'static str,
            visitor: V,
        ) -> Result<V::Value, Error> {
            visitor.visit_unit()
        }

        fn deserialize_newtype_struct<V: Visitor<'de>>(
            self,
            _name: &'static str,
            visitor: V,
        ) -> Result<V::Value, Error> {
            visitor.visit_newtype_struct(self)
        }

        fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
            visitor.visit_seq(One {
                path: self.path,
                out: self.out,
                done: false,
            })
        }

        fn deserialize_tuple<V: Visitor<'de>>(
            self,
            _len: usize,
            visitor: V,
        ) -> Result<V::Value, Error> {
            self.deserialize_seq(visitor)
        }

        fn deserialize_tuple_struct<V: Visitor<'de>>(
            self,
            _name: &'static str,
            _len: usize,
            visitor: V,
        ) -> Result<V::Value, Error> {
            self.deserialize_seq(visitor)
        }

        fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
            // Free-form tables ([kafka.properties]) have no fields to document.
            visitor.visit_map(Fields {
                path: self.path,
                fields: &[],
                next: 0,
                out: self.out,
            })
        }

        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _name: &'static str,
            fields: &'static [&'static str],
            visitor: V,
        ) -> Result<V::Value, Error> {
            visitor.visit_map(Fields {
                path: self.path,
                fields,
                next: 0,
                out: self.out,
            })
        }

        /// A key whose value is one of some words (`delivery`): its first, so the struct
        /// around it goes on; an enum with data fails here, naming itself.
        fn deserialize_enum<V: Visitor<'de>>(
            self,
            name: &'static str,
            variants: &'static [&'static str],
            visitor: V,
        ) -> Result<V::Value, Error> {
            let Some(first) = variants.first() else {
                return Err(Error(format!(
                    "enum {name} at {} has no variants",
                    self.path
                )));
            };
            let word: de::value::StrDeserializer<'_, Error> = (*first).into_deserializer();
            visitor.visit_enum(word)
        }
    }

    struct Fields<'a> {
        path: String,
        fields: &'static [&'static str],
        next: usize,
        out: &'a RefCell<Vec<String>>,
    }

    impl<'de> MapAccess<'de> for Fields<'_> {
        type Error = Error;

        fn next_key_seed<K: DeserializeSeed<'de>>(
            &mut self,
            seed: K,
        ) -> Result<Option<K::Value>, Error> {
            let Some(name) = self.fields.get(self.next) else {
                return Ok(None);
            };
            self.out.borrow_mut().push(join(&self.path, name));
            let key: de::value::StrDeserializer<'_, Error> = name.into_deserializer();
            seed.deserialize(key).map(Some)
        }

        fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Error> {
            let name = self.fields[self.next];
            self.next += 1;
            seed.deserialize(Collector {
                path: join(&self.path, name),
                out: self.out,
            })
        }
    }

    /// A sequence of one element, so that the struct inside a list (`[[outbox]]`) is seen.
    struct One<'a> {
        path: String,
        out: &'a RefCell<Vec<String>>,
        done: bool,
    }

    impl<'de> SeqAccess<'de> for One<'_> {
        type Error = Error;

        fn next_element_seed<T: DeserializeSeed<'de>>(
            &mut self,
            seed: T,
        ) -> Result<Option<T::Value>, Error> {
            if std::mem::replace(&mut self.done, true) {
                return Ok(None);
            }
            seed.deserialize(Collector {
                path: self.path.clone(),
                out: self.out,
            })
            .map(Some)
        }
    }
}

/// Every key of the config file, as a dotted path (`relay.stall_timeout_secs`): the fields
/// of the file's shape, `ConfigFile` (`Config` holds the typed values built from it).
fn config_keys() -> Vec<String> {
    use serde::Deserialize;
    let out = RefCell::new(Vec::new());
    outbox_relay::config::ConfigFile::deserialize(fields::Collector {
        path: String::new(),
        out: &out,
    })
    .unwrap_or_else(|e| panic!("collecting Config's fields: {e}"));
    out.into_inner()
}

/// The example with its commented-out optional keys (`# key = value`) and sections
/// (`# [[message]]`) switched on.
fn uncommented_example() -> String {
    read("config/relay.example.toml")
        .lines()
        .map(|line| {
            let Some(rest) = line.strip_prefix("# ") else {
                return line.to_owned();
            };
            let is_key_value = rest.split_once(" = ").is_some_and(|(key, _)| {
                !key.is_empty()
                    && key
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            });
            // An optional section, e.g. `# [[message]]`, is switched on with its keys.
            let is_section = rest.starts_with('[')
                && rest.ends_with(']')
                && rest
                    .trim_matches(|c| c == '[' || c == ']')
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c == '.' || c == '_');
            if is_key_value || is_section {
                rest.to_owned()
            } else {
                line.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn all_env() -> BTreeSet<String> {
    ["PGPASSWORD", "KAFKA_PASSWORD"].map(str::to_owned).into()
}

#[test]
fn example_config_names_every_key() {
    let example = read("config/relay.example.toml");
    parse_config(&example, "config/relay.example.toml", &all_env());
    // Switched on, the optional keys must be valid too.
    let full = uncommented_example();
    parse_config(&full, "config/relay.example.toml, uncommented", &all_env());

    let value: toml::Value = toml::from_str(&full).expect("TOML");
    let keys = config_keys();
    for wanted in [
        "postgres.password_file",
        "metrics.listen",
        "relay.shutdown_timeout_secs",
        "outbox.header_columns",
        "kafka.properties",
    ] {
        assert!(keys.iter().any(|k| k == wanted), "field list {keys:?}");
    }
    for key in &keys {
        let mut node = &value;
        for part in key.split('.') {
            if let Some(first) = node.as_array().and_then(|a| a.first()) {
                node = first;
            }
            node = node.get(part).unwrap_or_else(|| {
                panic!("config/relay.example.toml does not name {key} (not even commented out as `# {part} = ...`)")
            });
        }
    }
}

#[test]
fn example_config_shows_the_real_defaults() {
    let example = parse_config(
        &read("config/relay.example.toml"),
        "config/relay.example.toml",
        &all_env(),
    );
    // The example spells out every default: with the required values copied over, a config
    // without any of it must come out the same.
    let mut minimal = minimal_config();
    minimal.postgres.url = example.postgres.url.clone();
    minimal.kafka.brokers = example.kafka.brokers.clone();
    minimal.outbox[0].table = example.outbox[0].table.clone();
    assert_eq!(format!("{example:#?}"), format!("{minimal:#?}"));

    // The librdkafka defaults listed in comments are the relay's.
    let text = read("config/relay.example.toml");
    let listed: Vec<(String, String)> = text
        .lines()
        .skip_while(|l| !l.contains("defaults, which are"))
        .skip(1)
        .map_while(|l| {
            let (k, v) = l.strip_prefix("#   \"")?.split_once("\" = \"")?;
            Some((k.to_owned(), v.split('"').next()?.to_owned()))
        })
        .collect();
    let actual: Vec<(String, String)> = outbox_relay::kafka::producer::DEFAULT_PROPERTIES
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    assert_eq!(listed, actual, "the example's list of producer defaults");
    assert!(actual.contains(&("message.timeout.ms".into(), "0".into())));
}

#[test]
fn example_config_shows_tls_and_secrets() {
    let text = read("config/relay.example.toml");
    for needle in [
        "sslmode",
        "disable",
        "prefer",
        "require",
        "verify-ca",
        "verify-full",
        "sslrootcert",
        "password_file",
        "${PGPASSWORD}",
        "\"security.protocol\" = \"sasl_ssl\"",
        "\"ssl.ca.location\"",
        "\"sasl.mechanism\" = \"SCRAM-SHA-512\"",
        "\"sasl.username\"",
        "\"sasl.password\" = \"${KAFKA_PASSWORD}\"",
    ] {
        assert!(
            text.contains(needle),
            "config/relay.example.toml does not show {needle}"
        );
    }
}

/// The Kafka TLS/SASL lines of the example, under [kafka.properties], are settings this
/// build of librdkafka accepts (it was built with OpenSSL and SCRAM).
#[test]
fn example_kafka_tls_and_sasl_settings_are_accepted_by_librdkafka() {
    use rdkafka::producer::BaseProducer;
    let text = read("config/relay.example.toml");
    let ca = tempfile::NamedTempFile::new().expect("temp file");
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("cert");
    std::fs::write(ca.path(), cert.cert.pem()).expect("write CA");
    let start = text.find("# Kafka over TLS").expect("a Kafka TLS example");
    let mut config = minimal_config().kafka;
    for line in text[start..].lines().skip(1) {
        let Some(setting) = line.strip_prefix("#   \"") else {
            break;
        };
        let (key, value) = setting.split_once("\" = \"").expect("\"key\" = \"value\"");
        let value = value
            .trim_end_matches('"')
            .replace("${KAFKA_PASSWORD}", "secret");
        let value = if key == "ssl.ca.location" {
            ca.path().display().to_string()
        } else {
            value
        };
        config.properties.insert(key.to_owned(), value);
    }
    assert!(config.properties.len() >= 5, "{:?}", config.properties);
    outbox_relay::kafka::producer::client_config(&config, "packaging-test")
        .create::<BaseProducer>()
        .unwrap_or_else(|e| panic!("librdkafka refuses {:?}: {e}", config.properties));
}
