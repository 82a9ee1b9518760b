//! Reading rows: appliances, certificates, allowlist changes, brokers and operator
//! invites, from their columns to the store's types (and appliance statuses back).

use sqlx::any::AnyRow;
use sqlx::Row;

use super::db;
use crate::store::{
    AllowlistDelta, Appliance, ApplianceStatus, BrokerRecord, BrokerStatus, CertRecord, CertState,
    PlatformBinding, StoreError,
};

pub(super) fn status_str(status: ApplianceStatus) -> &'static str {
    match status {
        ApplianceStatus::Active => "active",
        ApplianceStatus::Disabled => "disabled",
        ApplianceStatus::Revoked => "revoked",
    }
}

pub(super) fn parse_status(s: &str) -> Result<ApplianceStatus, StoreError> {
    match s {
        "active" => Ok(ApplianceStatus::Active),
        "disabled" => Ok(ApplianceStatus::Disabled),
        "revoked" => Ok(ApplianceStatus::Revoked),
        other => Err(StoreError::Database(format!(
            "unknown appliance status {other:?}"
        ))),
    }
}

pub(super) const APPLIANCE_COLUMNS: &str =
    "id, tenant, binding, status, manual_renewal_generation, created_at";

pub(super) fn appliance_from_row(row: &AnyRow) -> Result<Appliance, StoreError> {
    let binding: String = row.try_get("binding").map_err(db)?;
    let binding: PlatformBinding = serde_json::from_str(&binding)
        .map_err(|e| StoreError::Database(format!("bad platform binding in the store: {e}")))?;
    let status: String = row.try_get("status").map_err(db)?;
    Ok(Appliance {
        id: row.try_get("id").map_err(db)?,
        tenant: row.try_get("tenant").map_err(db)?,
        binding,
        status: parse_status(&status)?,
        manual_renewal_generation: row.try_get("manual_renewal_generation").map_err(db)?,
        created_at: row.try_get("created_at").map_err(db)?,
    })
}

pub(super) const CERT_COLUMNS: &str =
    "serial, appliance_id, fingerprint, not_before, not_after, state, previous_until";

pub(super) fn cert_from_row(row: &AnyRow) -> Result<CertRecord, StoreError> {
    let state: String = row.try_get("state").map_err(db)?;
    let until: Option<i64> = row.try_get("previous_until").map_err(db)?;
    let state = match (state.as_str(), until) {
        ("current", _) => CertState::Current,
        ("previous", Some(until)) => CertState::PreviousUntil(until),
        ("revoked", _) => CertState::Revoked,
        (other, _) => {
            return Err(StoreError::Database(format!(
                "bad certificate state {other:?} in the store"
            )))
        }
    };
    Ok(CertRecord {
        serial: row.try_get("serial").map_err(db)?,
        appliance_id: row.try_get("appliance_id").map_err(db)?,
        fingerprint: row.try_get("fingerprint").map_err(db)?,
        not_before: row.try_get("not_before").map_err(db)?,
        not_after: row.try_get("not_after").map_err(db)?,
        state,
    })
}

pub(super) fn delta_from_row(row: &AnyRow) -> Result<AllowlistDelta, StoreError> {
    let added: i64 = row.try_get("added").map_err(db)?;
    Ok(AllowlistDelta {
        version: row.try_get("version").map_err(db)?,
        appliance_id: row.try_get("appliance_id").map_err(db)?,
        fingerprint: row.try_get("fingerprint").map_err(db)?,
        added: added != 0,
    })
}

pub(super) const BROKER_COLUMNS: &str =
    "name, status, created_at, fingerprint, not_after, quic_addr, last_seen";

pub(super) fn broker_from_row(row: &AnyRow) -> Result<BrokerRecord, StoreError> {
    let status: String = row.try_get("status").map_err(db)?;
    let status = match status.as_str() {
        "pending" => BrokerStatus::Pending,
        "active" => BrokerStatus::Active,
        "revoked" => BrokerStatus::Revoked,
        other => {
            return Err(StoreError::Database(format!(
                "unknown broker status {other:?}"
            )))
        }
    };
    Ok(BrokerRecord {
        name: row.try_get("name").map_err(db)?,
        status,
        created_at: row.try_get("created_at").map_err(db)?,
        fingerprint: row.try_get("fingerprint").map_err(db)?,
        not_after: row.try_get("not_after").map_err(db)?,
        quic_addr: row.try_get("quic_addr").map_err(db)?,
        last_seen: row.try_get("last_seen").map_err(db)?,
    })
}

pub(super) fn parse_role(row: &AnyRow) -> Result<tether_api::operators::Role, StoreError> {
    let role: String = row.try_get("role").map_err(db)?;
    tether_api::operators::Role::parse(&role)
        .ok_or_else(|| StoreError::Database(format!("unknown operator role {role:?}")))
}

pub(super) fn parse_operator_status(
    row: &AnyRow,
) -> Result<tether_api::operators::OperatorStatus, StoreError> {
    let status: String = row.try_get("status").map_err(db)?;
    tether_api::operators::OperatorStatus::parse(&status)
        .ok_or_else(|| StoreError::Database(format!("unknown operator status {status:?}")))
}

pub(super) fn invite_from_row(row: &AnyRow) -> Result<crate::store::Invite, StoreError> {
    let cancelled: i64 = row.try_get("cancelled").map_err(db)?;
    Ok(crate::store::Invite {
        name: row.try_get("name").map_err(db)?,
        role: parse_role(row)?,
        expires_at: row.try_get("expires_at").map_err(db)?,
        used_at: row.try_get("used_at").map_err(db)?,
        cancelled: cancelled != 0,
    })
}
