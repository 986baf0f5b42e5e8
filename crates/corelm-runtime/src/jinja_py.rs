//! The Python behaviours chat templates lean on that minijinja does not share with Jinja2 under
//! transformers: transformers' `tojson` filter (Python's `json.dumps`, not Jinja's HTML-safe
//! compact form), the `strftime_now` global (Python's `strftime`), Python's `str()` wherever
//! Jinja2 turns a value into text (`{{ value }}`, `string`, `join`, `upper`, `lower`: `True`,
//! `None`, `{'a': [1, 2.5]}`), and the `{% generation %}` block of transformers' AssistantTracker.

use std::fmt::Write as _;

use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Error, ErrorKind, Output, State};
use serde_json::Value as Json;
use unicode_categories::UnicodeCategories;

/// `str(value)` as Python writes it, for the values a template holds: strings as they are,
/// `None`, `True`, `False`, numbers as `repr` writes them, lists and dicts with the `repr` of
/// their items; undefined is empty (Jinja2's `Undefined`).
pub fn py_str(value: &Value) -> String {
    match value.kind() {
        ValueKind::Undefined => String::new(),
        ValueKind::String => value.as_str().unwrap_or_default().to_string(),
        _ => {
            let mut out = String::new();
            py_repr(value, &mut out);
            out
        }
    }
}

/// How deep [`py_repr`] follows nested lists and dicts; deeper ones (only a template building
/// them in a loop gets there: Python itself gives up near 1000) are written `...`, so that
/// writing them cannot exhaust the stack.
const MAX_REPR_DEPTH: usize = 200;

/// `repr(value)`: strings quoted and escaped as Python quotes them, containers recursively.
pub fn py_repr(value: &Value, out: &mut String) {
    repr_at(value, 0, out)
}

fn repr_at(value: &Value, depth: usize, out: &mut String) {
    let nested = matches!(value.kind(), ValueKind::Seq | ValueKind::Iterable | ValueKind::Map);
    if nested && depth >= MAX_REPR_DEPTH {
        out.push_str("...");
        return;
    }
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("None"),
        ValueKind::Bool => out.push_str(if value.is_true() { "True" } else { "False" }),
        ValueKind::Number if value.is_integer() => out.push_str(&value.to_string()),
        ValueKind::Number => out.push_str(&python_float(f64::try_from(value.clone()).unwrap_or(f64::NAN), false)),
        ValueKind::String => string_repr(value.as_str().unwrap_or_default(), out),
        ValueKind::Seq | ValueKind::Iterable => {
            out.push('[');
            for (i, item) in value.try_iter().into_iter().flatten().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                repr_at(&item, depth + 1, out);
            }
            out.push(']');
        }
        ValueKind::Map => {
            out.push('{');
            for (i, key) in value.try_iter().into_iter().flatten().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                repr_at(&key, depth + 1, out);
                out.push_str(": ");
                repr_at(&value.get_item(&key).unwrap_or_default(), depth + 1, out);
            }
            out.push('}');
        }
        // Bytes, objects without a Python form (namespaces, macros): minijinja's own text.
        _ => out.push_str(&value.to_string()),
    }
}

/// Python's `repr` of a string: single quotes unless the text holds a single quote and no
/// double one; backslash escapes for the quote, backslash, tab, newline, carriage return, and
/// for characters Python does not print (controls, format characters, separators other than
/// the space, private use), as `\xNN`, `\uNNNN` or `\UNNNNNNNN`.
fn string_repr(s: &str, out: &mut String) {
    let quote = if s.contains('\'') && !s.contains('"') { '"' } else { '\'' };
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            ' '..='~' => out.push(c),
            c if c.is_ascii() || !printable(c) => {
                let code = c as u32;
                let _ = match code {
                    0..=0xff => write!(out, "\\x{code:02x}"),
                    0x100..=0xffff => write!(out, "\\u{code:04x}"),
                    _ => write!(out, "\\U{code:08x}"),
                };
            }
            c => out.push(c),
        }
    }
    out.push(quote);
}

/// Python's `str.isprintable` for a non-ASCII character (unassigned code points aside).
fn printable(c: char) -> bool {
    !(c.is_other_control()
        || c.is_other_format()
        || c.is_other_private_use()
        || c.is_separator_space()
        || c.is_separator_line()
        || c.is_separator_paragraph())
}

/// How a `{{ ... }}` writes its value: as Jinja2 does under transformers (no autoescape), with
/// Python's `str()` for `None`, booleans, numbers, lists and dicts.
pub fn formatter(out: &mut Output, state: &State, value: &Value) -> Result<(), Error> {
    match value.kind() {
        ValueKind::None | ValueKind::Bool | ValueKind::Number | ValueKind::Seq | ValueKind::Map => {
            out.write_str(&py_str(value)).map_err(|e| Error::new(ErrorKind::WriteFailure, e.to_string()))
        }
        _ => minijinja::escape_formatter(out, state, value),
    }
}

/// The `string` filter: Python's `str()`.
pub fn string(value: &Value) -> String {
    py_str(value)
}

/// The `upper` filter: `str(value).upper()`.
pub fn upper(value: &Value) -> String {
    py_str(value).to_uppercase()
}

/// The `lower` filter: `str(value).lower()`.
pub fn lower(value: &Value) -> String {
    py_str(value).to_lowercase()
}

/// `join(value, d='', attribute=None)`: the items (or the named attribute of each, a dotted
/// path of keys and indices) as `str()` writes them, joined by `d`.
pub fn join(value: &Value, d: Option<&Value>, kwargs: Kwargs) -> Result<String, Error> {
    let attribute: Option<Value> = kwargs.get("attribute")?;
    kwargs.assert_all_used()?;
    let separator = d.map(py_str).unwrap_or_default();
    if value.is_undefined() || value.is_none() {
        return Ok(String::new());
    }
    let mut parts = Vec::new();
    for item in value.try_iter()? {
        let item = match &attribute {
            Some(path) => lookup(&item, path)?,
            None => item,
        };
        parts.push(py_str(&item));
    }
    Ok(parts.join(&separator))
}

/// Jinja2's attribute getter: an integer is an index; a string a dotted path of keys, each part
/// that is all digits an index.
fn lookup(item: &Value, path: &Value) -> Result<Value, Error> {
    let Some(path) = path.as_str() else { return item.get_item(path) };
    let mut current = item.clone();
    for part in path.split('.') {
        current = match part.parse::<usize>() {
            Ok(index) => current.get_item(&Value::from(index))?,
            Err(_) => current.get_item(&Value::from(part))?,
        };
    }
    Ok(current)
}

/// The callee `{% generation %}` blocks become: transformers' AssistantTracker renders the body
/// as it is (it only records where the body lands), so this calls the body and returns it.
pub const GENERATION_CALLEE: &str = "__corelm_generation_block";

/// [`GENERATION_CALLEE`]: the block's body, rendered.
pub fn generation_block(state: &State, kwargs: Kwargs) -> Result<Value, Error> {
    let caller: Value = kwargs.get("caller")?;
    kwargs.assert_all_used()?;
    caller.call(state, &[])
}

/// A template with its `{% generation %}` ... `{% endgeneration %}` blocks (a tag minijinja
/// does not know) written as `{% call GENERATION_CALLEE() %}` ... `{% endcall %}`: the same
/// whitespace control, and, as with Jinja2's call block, a body with its own scope. Text inside
/// `{% raw %}` blocks and comments is left alone.
pub fn rewrite_generation_blocks(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    let mut raw = false;
    while let Some(start) = rest.find(['{']) {
        out.push_str(&rest[..start]);
        rest = &rest[start..];
        if rest.starts_with("{#") && !raw {
            let end = rest.find("#}").map_or(rest.len(), |e| e + 2);
            out.push_str(&rest[..end]);
            rest = &rest[end..];
            continue;
        }
        let Some(tag) = block_tag(rest) else {
            out.push('{');
            rest = &rest[1..];
            continue;
        };
        let replacement = match (tag.name, raw) {
            ("raw", false) => {
                raw = true;
                None
            }
            ("endraw", true) => {
                raw = false;
                None
            }
            ("generation", false) => Some(format!("call {GENERATION_CALLEE}()")),
            ("endgeneration", false) => Some("endcall".to_string()),
            _ => None,
        };
        match replacement {
            Some(statement) => {
                out.push_str(&format!("{{%{} {statement} {}%}}", tag.open, tag.close));
            }
            None => out.push_str(&rest[..tag.len]),
        }
        rest = &rest[tag.len..];
    }
    out.push_str(rest);
    out
}

/// A block tag at the start of `text` whose statement is a single word: `{%- name +%}`.
struct BlockTag<'a> {
    /// The whitespace control after `{%` and before `%}` (`-`, `+` or nothing).
    open: &'a str,
    close: &'a str,
    name: &'a str,
    len: usize,
}

fn block_tag(text: &str) -> Option<BlockTag<'_>> {
    let body = text.strip_prefix("{%")?;
    let end = body.find("%}")?;
    let inner = &body[..end];
    let (open, inner) = match inner.chars().next() {
        Some(c @ ('-' | '+')) => (&body[..c.len_utf8()], &inner[1..]),
        _ => ("", inner),
    };
    let (close, inner) = match inner.chars().last() {
        Some(c @ ('-' | '+')) => (&body[end - c.len_utf8()..end], &inner[..inner.len() - 1]),
        _ => ("", inner),
    };
    let name = inner.trim();
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return None;
    }
    Some(BlockTag { open, close, name, len: 2 + end + 2 })
}

/// `value | tojson(ensure_ascii=False, indent=None, separators=None, sort_keys=False)`, byte
/// for byte what transformers' filter (`json.dumps` with those arguments) writes.
pub fn tojson(value: Value, kwargs: Kwargs) -> Result<String, Error> {
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let indent: Option<usize> = kwargs.get("indent")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(&value).map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let (item, key) = match separators.as_deref() {
        Some([item, key]) => (item.clone(), key.clone()),
        Some(_) => return Err(Error::new(ErrorKind::InvalidOperation, "separators must be a pair")),
        // Python's defaults: no space before a newline when indenting.
        None => ((if indent.is_some() { "," } else { ", " }).to_string(), ": ".to_string()),
    };
    let style =
        Style { ensure_ascii: ensure_ascii.unwrap_or(false), indent, item, key, sort_keys: sort_keys.unwrap_or(false) };
    let mut out = String::new();
    style.write(&json, 0, &mut out);
    Ok(out)
}

struct Style {
    ensure_ascii: bool,
    indent: Option<usize>,
    item: String,
    key: String,
    sort_keys: bool,
}

impl Style {
    fn write(&self, v: &Json, depth: usize, out: &mut String) {
        match v {
            Json::Null => out.push_str("null"),
            Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Json::Number(n) => out.push_str(&python_number(n)),
            Json::String(s) => self.string(s, out),
            Json::Array(items) => {
                let items: Vec<(Option<&str>, &Json)> = items.iter().map(|v| (None, v)).collect();
                self.container(('[', ']'), &items, depth, out);
            }
            Json::Object(map) => {
                let mut items: Vec<(Option<&str>, &Json)> = map.iter().map(|(k, v)| (Some(k.as_str()), v)).collect();
                if self.sort_keys {
                    items.sort_by(|a, b| a.0.cmp(&b.0));
                }
                self.container(('{', '}'), &items, depth, out);
            }
        }
    }

    fn container(&self, (open, close): (char, char), items: &[(Option<&str>, &Json)], depth: usize, out: &mut String) {
        out.push(open);
        if items.is_empty() {
            out.push(close);
            return;
        }
        let newline = |out: &mut String, level: usize| {
            if let Some(n) = self.indent {
                out.push('\n');
                out.push_str(&" ".repeat(n * level));
            }
        };
        for (i, (key, value)) in items.iter().enumerate() {
            if i > 0 {
                out.push_str(&self.item);
            }
            newline(out, depth + 1);
            if let Some(k) = key {
                self.string(k, out);
                out.push_str(&self.key);
            }
            self.write(value, depth + 1, out);
        }
        newline(out, depth);
        out.push(close);
    }

    fn string(&self, s: &str, out: &mut String) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 || (self.ensure_ascii && !c.is_ascii()) => {
                    let mut units = [0u16; 2];
                    for u in c.encode_utf16(&mut units) {
                        out.push_str(&format!("\\u{u:04x}"));
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

/// A JSON number as `json.dumps` writes it: integers as they are, floats as [`python_float`]
/// (`NaN` and `Infinity` as JSON spells them).
fn python_number(n: &serde_json::Number) -> String {
    match n.as_f64().filter(|_| n.is_f64()) {
        Some(f) => python_float(f, true),
        None => n.to_string(),
    }
}

/// A float as Python's `repr` writes it: a `.0` or an exponent of at least two digits with its
/// sign (`1e+16`, `1e-05`), scientific from 1e16 up and below 1e-4; `nan`, `inf` (`NaN`,
/// `Infinity` for JSON).
pub fn python_float(f: f64, json: bool) -> String {
    if !f.is_finite() {
        let name = match (f.is_nan(), f > 0.0, json) {
            (true, _, true) => "NaN",
            (true, _, false) => "nan",
            (false, true, true) => "Infinity",
            (false, true, false) => "inf",
            (false, false, true) => "-Infinity",
            (false, false, false) => "-inf",
        };
        return name.to_string();
    }
    // The shortest digits that round-trip, as Python's repr chooses them.
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').expect("{:e} writes an exponent");
    let exp: i32 = exp.parse().expect("an integer exponent");
    if (-4..16).contains(&exp) {
        let plain = format!("{f}");
        if plain.contains('.') {
            plain
        } else {
            format!("{plain}.0")
        }
    } else {
        format!("{mantissa}e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs())
    }
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const DAYS: [&str; 7] = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"];

/// Python's `datetime.fromtimestamp(unix, timezone.utc).strftime(format)` for the directives
/// templates use (%Y %y %m %d %e %j %H %I %M %S %p %B %b %A %a %%); others stay as written.
pub fn strftime(format: &str, unix: i64) -> String {
    let (days, secs) = (unix.div_euclid(86_400), unix.rem_euclid(86_400));
    let (year, month, day) = civil_from_days(days);
    let (hour, minute, second) = (secs / 3600, secs / 60 % 60, secs % 60);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let year_day = days - days_from_civil(year, 1, 1) + 1;
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let Some(d) = chars.next() else {
            out.push('%');
            break;
        };
        let text = match d {
            'Y' => year.to_string(),
            'y' => format!("{:02}", year.rem_euclid(100)),
            'm' => format!("{month:02}"),
            'd' => format!("{day:02}"),
            'e' => format!("{day:>2}"),
            'j' => format!("{year_day:03}"),
            'H' => format!("{hour:02}"),
            'I' => format!("{:02}", (hour + 11) % 12 + 1),
            'M' => format!("{minute:02}"),
            'S' => format!("{second:02}"),
            'p' => (if hour < 12 { "AM" } else { "PM" }).to_string(),
            'B' => MONTHS[month as usize - 1].to_string(),
            'b' => MONTHS[month as usize - 1][..3].to_string(),
            'A' => DAYS[weekday].to_string(),
            'a' => DAYS[weekday][..3].to_string(),
            '%' => "%".to_string(),
            other => format!("%{other}"),
        };
        out.push_str(&text);
    }
    out
}

/// (year, month, day) of a day count since 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

/// The inverse of [`civil_from_days`].
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468
}

#[cfg(test)]
mod tests {
    use crate::chat::{ChatTemplate, TemplateArgs};

    fn render(source: &str) -> crate::Result<String> {
        let template = ChatTemplate::new(source.to_string(), Default::default(), "test")?;
        template.render_with(&[], &TemplateArgs::default())
    }

    /// A list nested deeper than Python would print is cut short, not followed down the stack.
    #[test]
    fn deeply_nested_values_print_without_exhausting_the_stack() {
        let source = "{% set ns = namespace(x=1) %}{% for i in range(20000) %}{% set ns.x = [ns.x] %}{% endfor %}\
                      {{ ns.x }}|{{ ns.x | string | length }}";
        let text = render(source).unwrap();
        assert!(text.starts_with(&"[".repeat(super::MAX_REPR_DEPTH)), "{}", &text[..300]);
        assert!(text.contains(&format!(
            "{}...{}|",
            "[".repeat(super::MAX_REPR_DEPTH),
            "]".repeat(super::MAX_REPR_DEPTH)
        )));
    }

    /// Only whole `generation` tags are rewritten; broken or foreign tags are left to the parser.
    #[test]
    fn generation_tags_are_rewritten_whole() {
        let rewrite = super::rewrite_generation_blocks;
        assert_eq!(
            rewrite("{%generation%}x{%-endgeneration+%}"),
            "{% call __corelm_generation_block() %}x{%- endcall +%}"
        );
        for text in [
            "{% generation",
            "{%-%}",
            "{%+-%}",
            "{% generations %}",
            "{% set g = 'generation' %}",
            "{#",
            "{{%}}",
            "{% raw %}{% generation %}",
            "é{%é%}{",
        ] {
            let out = rewrite(text);
            assert!(!out.contains("call"), "{text} became {out}");
            assert_eq!(out.len(), text.len(), "{text} became {out}");
        }
        assert_eq!(render("{% generation %}a{% endgeneration %}").unwrap(), "a");
        assert!(render("{% generation %}a").is_err());
    }
    /// Python's strftime of fixed instants (tests/fixtures/templates/strftime.json).
    #[test]
    fn strftime_matches_python() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/templates/strftime.json");
        let cases: Vec<serde_json::Value> = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        assert!(cases.len() >= 5);
        for c in cases {
            let got = super::strftime(c["format"].as_str().unwrap(), c["unix"].as_i64().unwrap());
            assert_eq!(got, c["text"].as_str().unwrap(), "{c}");
        }
    }
}
