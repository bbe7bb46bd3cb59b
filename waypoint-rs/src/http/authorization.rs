//! PLACEHOLDER (wp-config branch): replaced by wp-security's module at merge.

use api::l7;

use crate::request::{FieldError, FromProto};

/// One validated HttpAuthorization (the real one lives in wp-security).
pub struct Policy {}

impl FromProto<l7::HttpAuthorization> for Policy {
    fn from_proto(_: &l7::HttpAuthorization) -> Result<Self, FieldError> {
        Ok(Policy {})
    }
}
