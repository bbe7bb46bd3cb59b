//! PLACEHOLDER (wp-config branch): replaced by wp-security's module at merge.

use api::l7;

use crate::request::{FieldError, FromProto};

/// One validated JwtAuthentication (the real one lives in wp-security).
pub struct Authentication {}

impl FromProto<l7::JwtAuthentication> for Authentication {
    fn from_proto(_: &l7::JwtAuthentication) -> Result<Self, FieldError> {
        Ok(Authentication {})
    }
}
