//! The route table: which `/api/v1/<op>` paths exist, with which method, and how a request's
//! body or query becomes an [`ApiRequest`]. Every path of the upstream v53 spec is listed, with
//! upstream's method, so that an operation we do not implement reaches the control loop, which
//! answers it as upstream would for the VM's state, and 501 once the state allows it.

use serde::de::DeserializeOwned;

use super::{
    ApiError, ApiRequest, NvCheckpointConfig, NvRecoverConfig, NvRegionsQuery, NvSwapInConfig,
    NvSwapOutConfig, Operation, VmSnapshotConfig,
};
use crate::config::{RestoreConfig, VmConfig, SNAPSHOT_URL_EXPECTED};

/// The prefix every API path carries.
pub const API_PREFIX: &str = "/api/v1/";

/// The two methods the API uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HttpMethod {
    Get,
    Put,
}

impl HttpMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            HttpMethod::Get => "GET",
            HttpMethod::Put => "PUT",
        }
    }
}

/// One API path: `op` is the part after `/api/v1/`, its operation's [`Operation::path`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    pub op: &'static str,
    pub method: HttpMethod,
    /// The operation it asks for: [`build_request`] turns it into an [`ApiRequest`].
    pub operation: Operation,
    /// True for our NV additions (not in the upstream spec).
    pub nv_extension: bool,
}

const fn upstream(method: HttpMethod, operation: Operation) -> Route {
    Route {
        op: operation.path(),
        method,
        operation,
        nv_extension: false,
    }
}

const fn nv(method: HttpMethod, operation: Operation) -> Route {
    Route {
        op: operation.path(),
        method,
        operation,
        nv_extension: true,
    }
}

use HttpMethod::{Get, Put};
use Operation as O;

/// Every path we answer. Upstream's are in the order of its spec.
pub const ROUTES: &[Route] = &[
    upstream(Get, O::VmmPing),
    upstream(Put, O::VmmShutdown),
    upstream(Get, O::Info),
    upstream(Get, O::Counters),
    upstream(Put, O::Create),
    upstream(Put, O::Delete),
    upstream(Put, O::Boot),
    upstream(Put, O::Pause),
    upstream(Put, O::Resume),
    upstream(Put, O::Shutdown),
    upstream(Put, O::Reboot),
    upstream(Put, O::PowerButton),
    upstream(Put, O::Resize),
    upstream(Put, O::ResizeDisk),
    upstream(Put, O::ResizeZone),
    upstream(Put, O::AddDevice),
    upstream(Put, O::RemoveDevice),
    upstream(Put, O::AddDisk),
    upstream(Put, O::AddFs),
    upstream(Put, O::AddGenericVhostUser),
    upstream(Put, O::AddPmem),
    upstream(Put, O::AddNet),
    upstream(Put, O::AddVsock),
    upstream(Put, O::AddVdpa),
    upstream(Put, O::AddUserDevice),
    upstream(Put, O::Snapshot),
    upstream(Put, O::Coredump),
    upstream(Put, O::Nmi),
    upstream(Put, O::Restore),
    upstream(Put, O::ReceiveMigration),
    upstream(Put, O::SendMigration),
    nv(Get, O::NvStatus),
    nv(Put, O::NvPowerFail),
    nv(Put, O::NvSuspend),
    nv(Put, O::NvRecover),
    nv(Get, O::NvRegions),
    nv(Put, O::NvSwapOut),
    nv(Put, O::NvSwapIn),
    nv(Put, O::NvCheckpoint),
];

/// The route for a request path (without its query), if any.
pub fn find_route(path: &str) -> Option<&'static Route> {
    let op = path.strip_prefix(API_PREFIX)?;
    ROUTES.iter().find(|route| route.op == op)
}

/// Routes one request as the server does: an unknown path is 404 `["Not Found"]`, a known path
/// with the wrong method 400 `["Bad Request"]` (upstream's bare answers; the server adds `Allow`
/// from [`find_route`]), anything else goes to [`build_request`].
pub fn route_request(
    method: &str,
    path: &str,
    body: &[u8],
    query: Option<&str>,
) -> Result<ApiRequest, ApiError> {
    let route = find_route(path).ok_or_else(|| ApiError::http(404, "Not Found", None))?;
    if method != route.method.as_str() {
        return Err(ApiError::http(400, "Bad Request", None));
    }
    build_request(route, body, query)
}

/// Builds the control loop's request for a matched route from the request body and query.
/// Body-less operations ignore any body, as upstream does.
pub fn build_request(
    route: &Route,
    body: &[u8],
    query: Option<&str>,
) -> Result<ApiRequest, ApiError> {
    let request = match route.operation {
        O::VmmPing => ApiRequest::VmmPing,
        O::VmmShutdown => ApiRequest::VmmShutdown,
        O::Create => ApiRequest::VmCreate(Box::new(parse_vm_config(route, body)?)),
        O::Boot => ApiRequest::VmBoot,
        O::Delete => ApiRequest::VmDelete,
        O::Info => ApiRequest::VmInfo,
        O::Counters => ApiRequest::VmCounters,
        O::Pause => ApiRequest::VmPause,
        O::Resume => ApiRequest::VmResume,
        O::Shutdown => ApiRequest::VmShutdown,
        O::Reboot => ApiRequest::VmReboot,
        O::PowerButton => ApiRequest::VmPowerButton,
        O::Snapshot => {
            let config = parse_body::<VmSnapshotConfig>(route, body)?;
            if config.destination_url.is_empty() {
                return Err(ApiError::invalid_request(
                    "vm.snapshot: destination_url must not be empty",
                ));
            }
            ApiRequest::VmSnapshot(config)
        }
        O::Restore => {
            let raw: serde_json::Value = parse_body(route, body)?;
            // Upstream resizes memory zones on restore; serde would drop the member silently.
            let zone_updates = raw.get("zone_updates");
            if zone_updates.is_some_and(|updates| {
                !(updates.is_null() || updates.as_array().is_some_and(Vec::is_empty))
            }) {
                return Err(ApiError::invalid_request(
                    "vm.restore: zone_updates is not supported by this VMM",
                ));
            }
            let config: RestoreConfig =
                serde_json::from_slice(body).map_err(|error| ApiError::deserialize(&error))?;
            if config.source_dir().is_none() {
                return Err(ApiError::invalid_request(format!(
                    "vm.restore: source_url {:?}: {SNAPSHOT_URL_EXPECTED}",
                    config.source_url
                )));
            }
            ApiRequest::VmRestore(config)
        }
        O::AddDisk => ApiRequest::VmAddDisk(Box::new(parse_body(route, body)?)),
        O::AddNet => ApiRequest::VmAddNet(Box::new(parse_body(route, body)?), Vec::new()),
        O::AddFs => ApiRequest::VmAddFs(Box::new(parse_body(route, body)?)),
        O::RemoveDevice => ApiRequest::VmRemoveDevice(parse_body(route, body)?),
        O::NvStatus => ApiRequest::NvStatus,
        O::NvPowerFail => ApiRequest::NvPowerFail,
        O::NvSuspend => ApiRequest::NvSuspend,
        O::NvRecover => {
            let config = parse_body::<NvRecoverConfig>(route, body)?;
            if config.region.is_empty() || config.vm.is_empty() {
                return Err(ApiError::invalid_request(
                    "vm.nv-recover: region and vm must both be non-empty",
                ));
            }
            ApiRequest::NvRecover(config)
        }
        O::NvRegions => ApiRequest::NvRegions(parse_regions_query(query)?),
        O::NvCheckpoint => {
            let config = parse_body::<NvCheckpointConfig>(route, body)?;
            if config.interval_ms > crate::config::MAX_CHECKPOINT_MS {
                return Err(ApiError::invalid_request(format!(
                    "vm.nv-checkpoint: interval_ms {} is above the maximum of {} ms (0 turns \
                     checkpoints off)",
                    config.interval_ms,
                    crate::config::MAX_CHECKPOINT_MS
                )));
            }
            ApiRequest::NvCheckpoint(config)
        }
        O::NvSwapOut => {
            let config = parse_body::<NvSwapOutConfig>(route, body)?;
            swap_file_path(route, "destination_url", &config.destination_url)?;
            ApiRequest::NvSwapOut(config)
        }
        O::NvSwapIn => {
            let config = parse_body::<NvSwapInConfig>(route, body)?;
            swap_file_path(route, "source_url", &config.source_url)?;
            if config.region.as_deref().is_some_and(str::is_empty)
                || config.vm.as_deref().is_some_and(str::is_empty)
            {
                return Err(ApiError::invalid_request(
                    "vm.nv-swap-in: region and vm, when given, must not be empty",
                ));
            }
            ApiRequest::NvSwapIn(config)
        }
        // Upstream operations this VMM does not implement (`Operation::is_unimplemented`).
        operation => ApiRequest::Unimplemented(operation),
    };
    Ok(request)
}

/// A swap file URL must be `file:///absolute/path` naming a file (not a directory).
fn swap_file_path(route: &Route, member: &str, url: &str) -> Result<(), ApiError> {
    match crate::config::swap_file_url_path(url) {
        Some(_) => Ok(()),
        None => Err(ApiError::invalid_request(format!(
            "{}: {member} {url:?}: {}",
            route.op,
            crate::config::SWAP_URL_EXPECTED
        ))),
    }
}

fn parse_body<T: DeserializeOwned>(route: &Route, body: &[u8]) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::http(
            400,
            "Bad Request",
            Some(format!("{}: a JSON request body is required", route.op)),
        ));
    }
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|error| ApiError::deserialize(&error))?;
    refuse_nul_bytes(&value)?;
    serde_json::from_slice(body).map_err(|error| ApiError::deserialize(&error))
}

/// No member of any request holds a NUL byte legitimately; in a path it would only fail later,
/// deep in a system call, as an internal error.
fn refuse_nul_bytes(value: &serde_json::Value) -> Result<(), ApiError> {
    match value {
        serde_json::Value::String(text) if text.contains('\0') => Err(ApiError::invalid_request(
            format!("a string in the request holds a NUL byte: {text:?}"),
        )),
        serde_json::Value::Array(items) => items.iter().try_for_each(refuse_nul_bytes),
        serde_json::Value::Object(members) => members.values().try_for_each(refuse_nul_bytes),
        _ => Ok(()),
    }
}

/// A `vm.create` body: upstream members we do not implement are refused by name (serde alone
/// would drop them silently), then the config is checked as the command line's is.
fn parse_vm_config(route: &Route, body: &[u8]) -> Result<VmConfig, ApiError> {
    let raw: serde_json::Value = parse_body(route, body)?;
    crate::upstream_fields::check_vm_config_fields(&raw)
        .map_err(|error| ApiError::invalid_request(format!("{}: {error}", route.op)))?;
    // From the bytes, not the value: serde's message then says where (line and column).
    let config: VmConfig =
        serde_json::from_slice(body).map_err(|error| ApiError::deserialize(&error))?;
    config
        .validate()
        .map_err(|error| ApiError::invalid_request(format!("{}: {error}", route.op)))?;
    Ok(config)
}

/// `region=PATH` from the query string, percent-decoded (`+` is not a space here: paths may hold
/// one, and clients encode spaces as `%20`).
fn parse_regions_query(query: Option<&str>) -> Result<NvRegionsQuery, ApiError> {
    let mut region = None;
    for pair in query
        .unwrap_or("")
        .split('&')
        .filter(|pair| !pair.is_empty())
    {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if key != "region" {
            return Err(ApiError::invalid_request(format!(
                "vmm.nv-regions: unknown query parameter {key:?} (only region=PATH)"
            )));
        }
        let decoded = percent_encoding::percent_decode_str(value)
            .decode_utf8()
            .map_err(|_| ApiError::invalid_request("vmm.nv-regions: region is not valid UTF-8"))?;
        if decoded.contains('\0') {
            return Err(ApiError::invalid_request(
                "vmm.nv-regions: region holds a NUL byte",
            ));
        }
        region = Some(decoded.into_owned());
    }
    match region {
        Some(region) if !region.is_empty() => Ok(NvRegionsQuery { region }),
        _ => Err(ApiError::invalid_request(
            "vmm.nv-regions: the query parameter region=PATH is required",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_op_is_listed_once() {
        for (index, route) in ROUTES.iter().enumerate() {
            assert!(
                ROUTES[index + 1..].iter().all(|other| other.op != route.op),
                "{} listed twice",
                route.op
            );
        }
    }

    #[test]
    fn paths_need_the_prefix() {
        assert!(find_route("/api/v1/vm.boot").is_some());
        assert!(find_route("/vm.boot").is_none());
        assert!(find_route("/api/v1/vm.boot/").is_none());
        assert!(find_route("/api/v2/vm.boot").is_none());
    }

    #[test]
    fn regions_query_is_decoded() {
        let query = parse_regions_query(Some("region=%2Ftmp%2Fmy%20region+x")).unwrap();
        assert_eq!(query.region, "/tmp/my region+x");
        assert_eq!(parse_regions_query(None).unwrap_err().status, 400);
        assert_eq!(
            parse_regions_query(Some("region=")).unwrap_err().status,
            400
        );
        assert_eq!(
            parse_regions_query(Some("region=/a&foo=1"))
                .unwrap_err()
                .status,
            400
        );
        assert_eq!(
            parse_regions_query(Some("region=%FF")).unwrap_err().status,
            400
        );
    }

    #[test]
    fn bodies_are_required_and_checked() {
        let create = find_route("/api/v1/vm.create").unwrap();
        assert_eq!(build_request(create, b"", None).unwrap_err().status, 400);
        assert_eq!(build_request(create, b"{", None).unwrap_err().status, 400);
        assert!(matches!(
            build_request(create, br#"{"payload":{"kernel":"/k"}}"#, None),
            Ok(ApiRequest::VmCreate(config)) if config.payload.kernel.as_deref() == Some("/k")
        ));
        let refused = |body: &str| build_request(create, body.as_bytes(), None).unwrap_err();
        let error = refused(r#"{"payload":{"kernel":"/k"},"net":[{"tap":"tap0","mac":"xx"}]}"#);
        assert_eq!(error.status, 400);
        assert!(error.message.contains("invalid mac"), "{}", error.message);
        assert_eq!(error.body()[0], "Bad Request");
        // Unknown members are ignored (and logged), as upstream does.
        assert!(build_request(
            create,
            br#"{"payload":{"kernel":"/k"},"colour":"red"}"#,
            None
        )
        .is_ok());
        let error = refused(r#"{"payload":{"kernel":"/k"},"cpus":{"boot_vcpus":0,"max_vcpus":1}}"#);
        assert_eq!(error.status, 400);
        assert!(error.message.contains("vCPU"), "{}", error.message);
        let restore = find_route("/api/v1/vm.restore").unwrap();
        let error = build_request(
            restore,
            br#"{"source_url":"file:///s","zone_updates":[{"id":"z","size":1}]}"#,
            None,
        )
        .unwrap_err();
        assert!(error.message.contains("zone_updates"), "{}", error.message);
        assert!(matches!(
            build_request(
                restore,
                br#"{"source_url":"file:///s","zone_updates":[]}"#,
                None
            ),
            Ok(ApiRequest::VmRestore(_))
        ));
        let recover = find_route("/api/v1/vm.nv-recover").unwrap();
        assert_eq!(
            build_request(recover, br#"{"region":"/r"}"#, None)
                .unwrap_err()
                .status,
            400
        );
        assert_eq!(
            build_request(recover, br#"{"region":"/r","vm":""}"#, None)
                .unwrap_err()
                .status,
            400
        );
        let boot = find_route("/api/v1/vm.boot").unwrap();
        assert!(matches!(
            build_request(boot, b"ignored", None),
            Ok(ApiRequest::VmBoot)
        ));
        let resize = find_route("/api/v1/vm.resize").unwrap();
        assert!(matches!(
            build_request(resize, b"{}", None),
            Ok(ApiRequest::Unimplemented(Operation::Resize))
        ));
        // Upstream's own message for this body, word for word.
        let error = build_request(create, b"{not json", None).unwrap_err();
        assert_eq!(
            error.body(),
            [
                "Failed to deserialize JSON",
                "key must be a string at line 1 column 2"
            ]
        );
        // A NUL byte in any member (here a path) is refused here, not deep in a system call.
        let error = build_request(
            find_route("/api/v1/vm.snapshot").unwrap(),
            br#"{"destination_url":"file:///tmp/a\u0000b"}"#,
            None,
        )
        .unwrap_err();
        assert_eq!(
            (error.status, error.body()[0].as_str()),
            (400, "Bad Request")
        );
        assert_eq!(
            parse_regions_query(Some("region=%2Fr%00x"))
                .unwrap_err()
                .status,
            400
        );
    }
}
