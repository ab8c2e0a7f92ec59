//! One pass over the parsed file against [`keys::SECTIONS`]: every unknown section or key and
//! every value of the wrong type is an error, every Kata key we do not read a warning, each
//! with its line; what is left is the table our section structs deserialize from, Kata's
//! names and units turned into ours.

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize as _;
use toml::de::{DeTable, DeValue, ValueDeserializer};
use toml::Spanned;

use super::keys::{self, Kind, Section};
use super::{line_col, Problem};

/// What the pass found.
#[derive(Debug, Default)]
pub(super) struct Walked {
    /// The known keys with values of the right type, under our section names.
    pub table: toml::Table,
    /// Unknown sections and keys, values of the wrong type, keys set twice.
    pub errors: Vec<Problem>,
    /// Whether some of `errors` is a value of the wrong type or a required key missing (so
    /// `table` lacks a key, and checks of the values would mislead).
    pub bad_values: bool,
    /// Kata keys read by nothing here.
    pub warnings: Vec<Problem>,
    /// Where each key of `table` was set.
    pub lines: super::KeyLines,
}

/// Walks `text`; `Err` is a syntax error (nothing else can be said then).
pub(super) fn walk(text: &str) -> Result<Walked, toml::de::Error> {
    let root = DeTable::parse(text)?;
    let mut w = Walker {
        text,
        out: Walked::default(),
        set: BTreeMap::new(),
        seen: BTreeSet::new(),
    };
    w.tree("", 1, root.get_ref());
    w.out.errors.sort_by_key(|p| p.line);
    w.out.warnings.sort_by_key(|p| p.line);
    for (section, key) in keys::REQUIRED {
        if !w.seen.contains(&(*section, *key)) {
            w.out.bad_values = true;
            w.out.errors.push(Problem {
                line: None,
                message: format!("`{key}` in [{section}] is required"),
            });
        }
    }
    Ok(w.out)
}

struct Walker<'t> {
    text: &'t str,
    out: Walked,
    /// Where each (our section, key) was set, to refuse a second setting.
    set: BTreeMap<(&'static str, &'static str), (usize, &'static str)>,
    /// The (our section, key) the file has, of a good value or not.
    seen: BTreeSet<(&'static str, &'static str)>,
}

impl Walker<'_> {
    fn line(&self, span: std::ops::Range<usize>) -> usize {
        line_col(self.text, span.start).0
    }

    fn error(&mut self, line: usize, message: String) {
        self.out.errors.push(Problem {
            line: Some(line),
            message,
        });
    }

    /// Tables that are not sections themselves: the top level, `[hypervisor]`, `[shim]`
    /// (whose header is at `header`).
    fn tree(&mut self, prefix: &str, header: usize, table: &DeTable<'_>) {
        let mut unknown_here = false;
        for (key, value) in in_file_order(table) {
            let name = if prefix.is_empty() {
                key.get_ref().to_string()
            } else {
                format!("{prefix}.{}", key.get_ref())
            };
            let line = self.line(key.span());
            match value.get_ref() {
                DeValue::Table(t) => {
                    if let Some(section) = keys::section(&name) {
                        self.section(section, t);
                    } else if keys::is_prefix(&name) {
                        self.tree(&name, line, t);
                    } else {
                        let message = unknown_section(&name);
                        self.error(line, message);
                    }
                }
                _ if prefix.is_empty() => self.error(
                    line,
                    format!(
                        "`{}` is outside any section: put it under its [section]",
                        key.get_ref()
                    ),
                ),
                // A key in `[shim]`, `[hypervisor]`: the section itself is unknown.
                _ if !unknown_here => {
                    unknown_here = true;
                    self.error(header, unknown_section(prefix));
                }
                _ => {}
            }
        }
    }

    fn section(&mut self, section: &'static Section, table: &DeTable<'_>) {
        for (key, value) in in_file_order(table) {
            let line = self.line(key.span());
            let k = key.get_ref().as_ref();
            if let DeValue::Table(t) = value.get_ref() {
                if let Some(sub) = keys::section(&format!("{}.{k}", section.name)) {
                    self.section(sub, t);
                    continue;
                }
            }
            let Some((listed, kind)) = section.kind(k) else {
                let mut message = format!("unknown key `{k}` in [{}]", section.name);
                if let Some(near) = nearest(k, section.names()) {
                    message.push_str(&format!(" (did you mean `{near}`?)"));
                }
                self.error(line, message);
                continue;
            };
            let name = section.name;
            if let Some(into) = section.into {
                self.seen.insert((into, listed));
            }
            match kind {
                Kind::Read(check) => {
                    if let Some(v) = self.value(name, k, line, value, Some(check)) {
                        self.put(section, listed, v, line);
                    }
                }
                Kind::Scaled { ours, factor } => {
                    let Some(v) = self.value(name, k, line, value, None) else {
                        continue;
                    };
                    match v.as_integer().and_then(|n| u64::try_from(n).ok()) {
                        Some(n) => {
                            match n.checked_mul(factor).and_then(|n| i64::try_from(n).ok()) {
                                Some(scaled) => {
                                    self.put(section, ours, toml::Value::from(scaled), line)
                                }
                                None => self.bad(line, format!("`{k}` in [{name}] is too large")),
                            }
                        }
                        None => self.bad(
                            line,
                            format!("`{k}` in [{name}] must be a whole number (Kata's unit)"),
                        ),
                    }
                }
                Kind::Use(ours) => self.out.warnings.push(Problem {
                    line: Some(line),
                    message: format!(
                        "Kata's `{k}` in [{name}] is not supported, ignored: use {ours}"
                    ),
                }),
                Kind::Ignored(why) => self.out.warnings.push(Problem {
                    line: Some(line),
                    message: format!("Kata's `{k}` in [{name}] is ignored: no equivalent: {why}"),
                }),
            }
        }
    }

    /// An error about a value: it leaves a key out of the table.
    fn bad(&mut self, line: usize, message: String) {
        self.out.bad_values = true;
        self.error(line, message);
    }

    /// The value as a `toml::Value`, checked against its field's type.
    fn value(
        &mut self,
        section: &str,
        key: &str,
        line: usize,
        value: &Spanned<DeValue<'_>>,
        check: Option<keys::Check>,
    ) -> Option<toml::Value> {
        let owned = toml::Value::deserialize(ValueDeserializer::from(value.clone()))
            .and_then(|v| check.map_or(Ok(()), |c| c(v.clone())).map(|()| v));
        match owned {
            Ok(v) => Some(v),
            Err(e) => {
                let msg = e.message().trim().replace('\n', " ");
                self.bad(line, format!("`{key}` in [{section}]: {msg}"));
                None
            }
        }
    }

    /// Sets `key` of `section`'s target table, once.
    fn put(
        &mut self,
        section: &'static Section,
        key: &'static str,
        value: toml::Value,
        line: usize,
    ) {
        let Some(into) = section.into else {
            return;
        };
        if let Some((first, first_section)) = self.set.get(&(into, key)) {
            let message = format!(
                "`{key}` is set twice: in [{first_section}] line {first} and in [{}]",
                section.name
            );
            self.error(line, message);
            return;
        }
        self.set.insert((into, key), (line, section.name));
        self.out.lines.insert((into, key), line);
        let mut table = &mut self.out.table;
        for part in into.split('.') {
            let entry = table
                .entry(part)
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            let toml::Value::Table(next) = entry else {
                return;
            };
            table = next;
        }
        table.insert(key.to_owned(), value);
    }
}

/// `table`'s entries as the file has them (a "set twice" names the first one first).
fn in_file_order<'a, 'i>(
    table: &'a DeTable<'i>,
) -> Vec<(
    &'a Spanned<toml::de::DeString<'i>>,
    &'a Spanned<DeValue<'i>>,
)> {
    let mut entries: Vec<_> = table.iter().collect();
    entries.sort_by_key(|(k, _)| k.span().start);
    entries
}

fn unknown_section(name: &str) -> String {
    if let Some(other) = name.strip_prefix("hypervisor.") {
        return format!(
            "unknown section [hypervisor.{other}]: vmfactory runs QEMU only, configured in [hypervisor.qemu]"
        );
    }
    let mut message = format!("unknown section [{name}]");
    if let Some(near) = nearest(name, keys::SECTIONS.iter().map(|s| s.name)) {
        message.push_str(&format!(" (did you mean [{near}]?)"));
    }
    message
}

/// The candidate closest to `word`, if it is a near miss (a typo, not another word).
fn nearest<'a>(word: &str, candidates: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .map(|c| (strsim::damerau_levenshtein(word, c), c))
        .filter(|(d, c)| *d <= (c.len().max(word.len()) / 3).max(1))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}
