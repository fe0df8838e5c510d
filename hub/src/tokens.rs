//! Bootstrap (join) tokens and API tokens as the hub keeps them: the public
//! part ([`TokenInfo`]) and the hash of the secret, never the secret.
//! Checking a presented token is pure: it takes the records and the time.

use std::collections::BTreeMap;

use edge_api::model::{Role, TokenInfo, TokenKind};
use edge_api::token::secret_matches;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct TokenRecord {
    #[serde(flatten)]
    pub info: TokenInfo,
    pub secret_hash: String,
}

/// Why a presented token was not accepted. The messages go back to the
/// agent (in its welcome) or the API client, so they name what to do, but
/// never tell a stranger whether an id exists.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenRefusal {
    #[error("unknown token or wrong secret")]
    Invalid,
    #[error("token {0} was revoked")]
    Revoked(String),
    #[error("token {0} expired")]
    Expired(String),
    #[error("token {0} has enrolled as many nodes as it may ({1})")]
    UsedUp(String, u32),
    #[error("token {0} is not a {1} token")]
    WrongKind(String, TokenKind),
}

/// Whether a token that exists is usable now (not revoked, not expired).
fn usable(rec: &TokenRecord, now_ms: u64) -> Result<(), TokenRefusal> {
    let id = &rec.info.id;
    if rec.info.revoked_ms.is_some() {
        return Err(TokenRefusal::Revoked(id.clone()));
    }
    if rec.info.expires_ms.is_some_and(|e| now_ms >= e) {
        return Err(TokenRefusal::Expired(id.clone()));
    }
    Ok(())
}

/// Finds and checks a presented `(id, secret)` of the given kind.
pub fn check<'a>(
    tokens: &'a BTreeMap<String, TokenRecord>,
    kind: TokenKind,
    id: &str,
    secret: &str,
    now_ms: u64,
) -> Result<&'a TokenRecord, TokenRefusal> {
    // The secret is checked before anything about the record is revealed.
    let rec = tokens.get(id).filter(|r| secret_matches(&r.secret_hash, secret)).ok_or(TokenRefusal::Invalid)?;
    if rec.info.kind != kind {
        return Err(TokenRefusal::WrongKind(id.to_string(), kind));
    }
    usable(rec, now_ms)?;
    Ok(rec)
}

/// As [`check`], for enrolling one more node with a join token.
pub fn check_enrolment<'a>(
    tokens: &'a BTreeMap<String, TokenRecord>,
    id: &str,
    secret: &str,
    now_ms: u64,
) -> Result<&'a TokenRecord, TokenRefusal> {
    let rec = check(tokens, TokenKind::Join, id, secret, now_ms)?;
    if let Some(max) = rec.info.max_uses
        && rec.info.uses >= max
    {
        return Err(TokenRefusal::UsedUp(id.to_string(), max));
    }
    Ok(rec)
}

/// The role of a presented API token, if it is valid now.
pub fn api_role(tokens: &BTreeMap<String, TokenRecord>, id: &str, secret: &str, now_ms: u64) -> Option<Role> {
    check(tokens, TokenKind::Api, id, secret, now_ms).ok().and_then(|r| r.info.role)
}

#[cfg(test)]
mod tests {
    use super::*;
    use edge_api::token::hash_secret;

    fn rec(id: &str, kind: TokenKind, secret: &str) -> TokenRecord {
        let mut info = TokenInfo::new(id, kind, 0, "test");
        info.role = (kind == TokenKind::Api).then_some(Role::Viewer);
        TokenRecord { info, secret_hash: hash_secret(secret) }
    }

    #[test]
    fn presented_tokens_are_checked_for_secret_kind_expiry_revocation_and_uses() {
        let mut tokens = BTreeMap::new();
        tokens.insert("join0001".into(), rec("join0001", TokenKind::Join, "s1"));
        tokens.insert("api00001".into(), rec("api00001", TokenKind::Api, "s2"));
        let mut expired = rec("old00001", TokenKind::Join, "s3");
        expired.info.expires_ms = Some(100);
        tokens.insert("old00001".into(), expired);
        let mut revoked = rec("rev00001", TokenKind::Join, "s4");
        revoked.info.revoked_ms = Some(1);
        tokens.insert("rev00001".into(), revoked);
        let mut once = rec("one00001", TokenKind::Join, "s5");
        once.info.max_uses = Some(1);
        once.info.uses = 1;
        tokens.insert("one00001".into(), once);

        let cases: &[(&str, &str, Result<(), TokenRefusal>)] = &[
            ("join0001", "s1", Ok(())),
            ("join0001", "wrong", Err(TokenRefusal::Invalid)),
            ("nobody00", "s1", Err(TokenRefusal::Invalid)),
            ("api00001", "s2", Err(TokenRefusal::WrongKind("api00001".into(), TokenKind::Join))),
            ("old00001", "s3", Err(TokenRefusal::Expired("old00001".into()))),
            ("rev00001", "s4", Err(TokenRefusal::Revoked("rev00001".into()))),
            ("one00001", "s5", Err(TokenRefusal::UsedUp("one00001".into(), 1))),
        ];
        for (id, secret, want) in cases {
            let got = check_enrolment(&tokens, id, secret, 100).map(|_| ());
            assert_eq!(&got, want, "{id}/{secret}");
        }
        // An expired or revoked token with a wrong secret says only "invalid".
        assert_eq!(check_enrolment(&tokens, "old00001", "x", 100).unwrap_err(), TokenRefusal::Invalid);
        assert_eq!(api_role(&tokens, "api00001", "s2", 0), Some(Role::Viewer));
        assert_eq!(api_role(&tokens, "join0001", "s1", 0), None);
        assert_eq!(api_role(&tokens, "api00001", "s1", 0), None);
    }
}
