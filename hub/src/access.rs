//! Who may do what: API tokens and roles, the embedded broker's login and
//! revocation questions, and the audit log and event log readers.

use std::sync::atomic::Ordering;
use std::time::Instant;

use edge_api::model::{AuditEntry, ListedEvent, Role, TokenInfo, TokenKind, TokenRequest};
use edge_api::names;
use edge_api::time::now_ms;
use edge_api::token::{ApiToken, JoinToken, hash_secret};
use tokio::sync::watch;

use crate::authz::Principal;
use crate::error::HubError;
use crate::hub::{AUDIT_ENTRIES, Hub, lock};
use crate::store::Collection;
use crate::tokens::{self, TokenRecord};

impl Hub {
    // ---- tokens and roles ----

    /// The token id and role of a presented API token, if it is valid now.
    pub fn authenticate(&self, presented: &str) -> Option<(String, Role)> {
        let t: ApiToken = presented.parse().ok()?;
        let inner = lock(&self.inner);
        tokens::api_role(&inner.d.tokens, &t.id, &t.secret, now_ms()).map(|r| (t.id, r))
    }

    /// Makes sure a token made at first start (`admin.token`, `join.token`)
    /// is known to the hub, hashed. A token the operator revoked stays
    /// revoked: its record is kept.
    pub fn ensure_bootstrap_token(
        &self,
        id: &str,
        secret: &str,
        kind: TokenKind,
        description: &str,
    ) -> Result<(), HubError> {
        self.mutate(|d, _| {
            if d.tokens.contains_key(id) {
                return Ok(());
            }
            let mut info = TokenInfo::new(id, kind, now_ms(), "bootstrap");
            info.role = (kind == TokenKind::Api).then_some(Role::Admin);
            info.description = description.to_string();
            d.tokens.insert(id.to_string(), TokenRecord { info, secret_hash: hash_secret(secret) });
            Ok(())
        })?;
        if kind == TokenKind::Join {
            self.send_all(self.broker_admin.add_bootstrap(id, secret));
        }
        Ok(())
    }

    /// Creates a token; answers it whole (the only time its secret is
    /// shown) with what the hub keeps of it.
    pub fn create_token(&self, req: TokenRequest, created_by: &str) -> Result<(String, TokenInfo), HubError> {
        let bad = |m: String| HubError::invalid(m);
        for (k, v) in &req.labels {
            names::check_label_key(k).map_err(&bad)?;
            names::check_label_value(v).map_err(&bad)?;
        }
        if req.role.is_some() && (!req.labels.is_empty() || req.require_approval || req.capacity.is_some()) {
            return Err(bad("labels, approval and capacity apply to join tokens, not API tokens".into()));
        }
        if req.max_uses == Some(0) {
            return Err(bad("max_uses must be at least 1".into()));
        }
        let now = now_ms();
        let (text, id, secret) = match req.role {
            Some(_) => {
                let t = ApiToken::generate().map_err(HubError::internal)?;
                (t.to_string(), t.id, t.secret)
            }
            None => {
                let t = JoinToken::generate(&self.key.public()).map_err(HubError::internal)?;
                (t.to_string(), t.id, t.secret)
            }
        };
        let kind = if req.role.is_some() { TokenKind::Api } else { TokenKind::Join };
        let mut info = TokenInfo::new(&id, kind, now, created_by);
        info.role = req.role;
        info.description = req.description.chars().take(200).collect();
        info.expires_ms = req.ttl.map(|t| now.saturating_add(t.0));
        info.max_uses = req.max_uses;
        info.labels = req.labels;
        info.require_approval = req.require_approval;
        info.capacity = req.capacity;
        let rec = TokenRecord { info: info.clone(), secret_hash: hash_secret(&secret) };
        self.mutate(|d, _| {
            d.tokens.insert(id.clone(), rec);
            Ok(())
        })?;
        if info.kind == TokenKind::Join {
            self.send_all(self.broker_admin.add_bootstrap(&id, &secret));
        }
        tracing::info!(token = %id, kind = %info.kind, "token created");
        Ok((text, info))
    }

    pub fn tokens(&self) -> Vec<TokenInfo> {
        lock(&self.inner).d.tokens.values().map(|t| t.info.clone()).collect()
    }

    /// Revokes a token at once: API calls with it fail, devices can no
    /// longer enrol with it, and bootstrap sessions using it are cut off.
    pub fn revoke_token(&self, id: &str) -> Result<TokenInfo, HubError> {
        let info = self.mutate(|d, _| {
            let t = d.tokens.get_mut(id).ok_or_else(|| HubError::not_found("token", id))?;
            if t.info.revoked_ms.is_none() {
                t.info.revoked_ms = Some(now_ms());
            }
            Ok(t.info.clone())
        })?;
        if info.kind == TokenKind::Join {
            self.send_all(self.broker_admin.remove_bootstrap(id));
        }
        self.revocations.send_modify(|r| *r += 1);
        tracing::info!(token = id, "token revoked");
        Ok(info)
    }

    /// Drops expired bootstrap tokens from an external broker (the embedded
    /// broker checks expiry at every login).
    pub(crate) fn expire_tokens(&self) {
        let now = now_ms();
        let expired: Vec<String> = lock(&self.inner)
            .d
            .tokens
            .values()
            .filter(|t| t.info.kind == TokenKind::Join && t.info.revoked_ms.is_none())
            .filter(|t| t.info.expires_ms.is_some_and(|e| e <= now && e > now.saturating_sub(2_000)))
            .map(|t| t.info.id.clone())
            .collect();
        for id in expired {
            self.send_all(self.broker_admin.remove_bootstrap(&id));
            self.revocations.send_modify(|r| *r += 1);
        }
    }

    // ---- the embedded broker's questions ----

    /// Who an MQTT login is, if it may connect at all (the embedded broker
    /// asks at every CONNECT). `hub_password` is the hub's own session's.
    pub fn mqtt_login(&self, client_id: &str, user: &str, pass: &str, hub_password: &str) -> Result<Principal, String> {
        let principal = if user == crate::broker::HUB_USER {
            if !edge_api::hex::ct_eq(pass.as_bytes(), hub_password.as_bytes()) {
                return Err("wrong password for the hub's user".into());
            }
            Principal::Hub
        } else if let Some(id) = edge_api::token::parse_bootstrap_user(user) {
            let name = crate::authz::joiner_name(client_id)
                .ok_or_else(|| format!("client id {client_id:?} is not edge-join-<node name>"))?;
            let inner = lock(&self.inner);
            tokens::check(&inner.d.tokens, TokenKind::Join, id, pass, now_ms()).map_err(|e| e.to_string())?;
            Principal::Joiner(name.to_string())
        } else {
            let inner = lock(&self.inner);
            let rec = inner.d.nodes.get(user).ok_or_else(|| format!("no enrolled node {user:?}"))?;
            let ok = rec.approved
                && rec.credential_hash.as_deref().is_some_and(|h| edge_api::token::secret_matches(h, pass));
            if !ok {
                return Err(format!("wrong credential for node {user:?}"));
            }
            Principal::Node(user.to_string())
        };
        if !crate::authz::client_id_ok(&principal, client_id) {
            return Err(format!("client id {client_id:?} does not belong to user {user:?}"));
        }
        Ok(principal)
    }

    /// Whether a connected principal is still allowed (after a revocation).
    /// `credential` is what it logged in with.
    pub fn mqtt_still_valid(&self, p: &Principal, user: &str, credential: &str) -> bool {
        let inner = lock(&self.inner);
        match p {
            Principal::Hub => true,
            Principal::Joiner(_) => edge_api::token::parse_bootstrap_user(user)
                .is_some_and(|id| tokens::check(&inner.d.tokens, TokenKind::Join, id, credential, now_ms()).is_ok()),
            Principal::Node(n) => {
                if inner.deleting.get(n).is_some_and(|until| Instant::now() < *until) {
                    return true;
                }
                inner.d.nodes.get(n).is_some_and(|rec| {
                    rec.approved
                        && rec
                            .credential_hash
                            .as_deref()
                            .is_some_and(|h| edge_api::token::secret_matches(h, credential))
                })
            }
        }
    }

    /// Changes whenever sessions should be checked again.
    pub fn revocations(&self) -> watch::Receiver<u64> {
        self.revocations.subscribe()
    }

    // ---- the audit log ----

    /// Records a call that changed (or tried to change) something. The
    /// entry is written to the store before the answer leaves.
    pub fn audit(&self, e: AuditEntry) {
        let seq = self.audit_seq.fetch_add(1, Ordering::Relaxed);
        let key = format!("{:020}-{seq:08}", e.ts_ms);
        let mut batch = crate::store::Batch::default();
        match serde_json::to_vec(&e) {
            Ok(v) => batch.put(Collection::Audit, key.clone(), v),
            Err(err) => {
                tracing::error!("cannot encode an audit entry: {err}");
                return;
            }
        }
        let mut audit = lock(&self.audit);
        audit.push_back((key, e));
        while audit.len() > AUDIT_ENTRIES {
            if let Some((oldest, _)) = audit.pop_front() {
                batch.delete(Collection::Audit, oldest);
            }
        }
        drop(audit);
        // Durable with the change it records, before the answer leaves
        // (the API waits for `Durability::settled`).
        match self.store.apply(batch) {
            Ok(()) => self.durability.applied(),
            Err(err) => tracing::error!("cannot persist an audit entry: {err}"),
        }
    }

    /// Events after the cursor `after`, about `object` if given, oldest
    /// first; and a receiver that changes when there are more.
    pub fn events(&self, after: Option<u64>, object: Option<&str>) -> (Vec<ListedEvent>, watch::Receiver<Option<u64>>) {
        let inner = lock(&self.inner);
        (inner.events.after(after, object), inner.events_seq.subscribe())
    }

    pub fn audit_log(&self) -> Vec<AuditEntry> {
        lock(&self.audit).iter().map(|(_, e)| e.clone()).collect()
    }
}
