//! Conversion helpers shared by every `FromProto` of the L7 contract: each
//! returns a [`FieldError`] naming the field it was given, so a caller only
//! prefixes the path (`routes[3].matches[0]`) with [`FieldError::within`].

use std::time::Duration;

use http::{HeaderName, HeaderValue};
use regex::{Regex, RegexBuilder};

use crate::request::{FieldError, FromProto};

/// Compiled size limit of one configured regex (bytes of the compiled
/// program). RE2 semantics keep matching linear in the input; this bounds
/// the memory a hostile or careless pattern can take. Envoy's
/// `safe_regex` bounds program size the same way (`max_program_size`).
pub const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// A regex that must match the whole input (Gateway API and Envoy
/// `safe_regex` semantics), compiled once.
pub fn full_match_regex(
    field: &str,
    pattern: &str,
    ignore_case: bool,
) -> Result<Regex, FieldError> {
    RegexBuilder::new(&format!("^(?:{pattern})$"))
        .case_insensitive(ignore_case)
        .size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map_err(|e| FieldError::new(field, regex_reason(pattern, &e)))
}

/// A regex used for search-and-replace (not anchored).
pub fn search_regex(field: &str, pattern: &str) -> Result<Regex, FieldError> {
    RegexBuilder::new(pattern)
        .size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map_err(|e| FieldError::new(field, regex_reason(pattern, &e)))
}

fn regex_reason(pattern: &str, e: &regex::Error) -> String {
    match e {
        regex::Error::CompiledTooBig(limit) => {
            format!("regex {pattern:?} compiles larger than the {limit}-byte limit; simplify it")
        }
        other => format!("regex {pattern:?} is not valid RE2 syntax: {other}"),
    }
}

/// A protobuf duration as a std one; negative or out-of-range values are refused.
pub fn duration(field: &str, d: &prost_types::Duration) -> Result<Duration, FieldError> {
    if d.seconds < 0 || d.nanos < 0 || d.nanos >= 1_000_000_000 {
        return Err(FieldError::new(
            field,
            format!(
                "{}s {}ns is not a non-negative duration",
                d.seconds, d.nanos
            ),
        ));
    }
    Ok(Duration::new(d.seconds as u64, d.nanos as u32))
}

pub fn optional_duration(
    field: &str,
    d: Option<&prost_types::Duration>,
) -> Result<Option<Duration>, FieldError> {
    d.map(|d| duration(field, d)).transpose()
}

pub fn port(field: &str, value: u32) -> Result<u16, FieldError> {
    u16::try_from(value)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| FieldError::new(field, format!("port {value} is not in 1-65535")))
}

/// A port where 0 means "not set".
pub fn optional_port(field: &str, value: u32) -> Result<Option<u16>, FieldError> {
    if value == 0 {
        Ok(None)
    } else {
        port(field, value).map(Some)
    }
}

pub fn header_name(field: &str, name: &str) -> Result<HeaderName, FieldError> {
    HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| FieldError::new(field, format!("{name:?} is not a valid header name")))
}

pub fn header_value(field: &str, value: &str) -> Result<HeaderValue, FieldError> {
    HeaderValue::from_str(value)
        .map_err(|_| FieldError::new(field, format!("{value:?} is not a valid header value")))
}

/// A share in millionths, at most 1,000,000.
pub fn per_million(field: &str, value: u32) -> Result<u32, FieldError> {
    if value > 1_000_000 {
        return Err(FieldError::new(
            field,
            format!("{value} is more than 1000000 (100%)"),
        ));
    }
    Ok(value)
}

/// Converts every element of a repeated field, naming the failing index
/// (`field[i].sub`).
pub fn each<P, T: FromProto<P>>(field: &str, items: &[P]) -> Result<Vec<T>, FieldError> {
    items
        .iter()
        .enumerate()
        .map(|(i, p)| T::from_proto(p).map_err(|e| e.within(format!("{field}[{i}]"))))
        .collect()
}

/// Converts an optional sub-message, naming it.
pub fn nested<P, T: FromProto<P>>(field: &str, item: Option<&P>) -> Result<Option<T>, FieldError> {
    item.map(|p| T::from_proto(p).map_err(|e| e.within(field)))
        .transpose()
}
