//! Conformance to `docs/openapi.yaml`: every JSON body the tests send in an accepted request, and
//! every JSON body the server answers, is validated against the schema of its path; every
//! status the server answers with success must be one the spec lists for the path; and the spec
//! holds every upstream v53 path and every route of the server, with the same method.

use serde_json::Value;

use integration_tests::openapi::{
    compile_component, component, load_yaml, spec, validate, workspace_file,
};

use super::super::{VmState, ROUTES};
use super::Reply;

/// Checks one exchange made by the tests against the spec (see `integration_tests::openapi`).
pub fn check_exchange(method: &str, op: &str, request_body: Option<&str>, reply: &Reply) {
    if let Err(error) = integration_tests::openapi::check_exchange(
        method,
        op,
        request_body,
        reply.status,
        &reply.body,
    ) {
        panic!("{error}");
    }
}

#[test]
fn the_validator_rejects_what_the_spec_forbids() {
    // Guards the checks above against passing vacuously (a schema that accepts anything).
    assert!(validate(
        &component("VmInfo"),
        &serde_json::json!({"state": "Running"})
    )
    .is_err());
    assert!(validate(
        &component("VmInfo"),
        &serde_json::json!({"state": "Bogus", "config": {"payload": {}}})
    )
    .is_err());
    assert!(validate(
        &component("VmmPingResponse"),
        &serde_json::json!({"pid": 1})
    )
    .is_err());
    assert!(validate(&component("NvStatus"), &serde_json::json!({"region": "/r"})).is_err());
    assert!(validate(
        &component("NvRecoverConfig"),
        &serde_json::json!({"region": "/r", "vm": "a", "extra": 1})
    )
    .is_err());
    assert!(validate(
        &component("VmCounters"),
        &serde_json::json!({"disk": {"reads": "many"}})
    )
    .is_err());
    assert!(validate(&component("VmState"), &serde_json::json!("Paused")).is_ok());
    for state in [
        VmState::Created,
        VmState::Running,
        VmState::Shutdown,
        VmState::Paused,
        VmState::BreakPoint,
    ] {
        let value = serde_json::to_value(state).unwrap();
        assert!(validate(&component("VmState"), &value).is_ok(), "{value}");
    }
}

#[test]
fn every_upstream_path_is_in_our_spec_with_its_method() {
    let upstream_file = workspace_file("../shared/reference/cloud-hypervisor-v53-openapi.yaml");
    let upstream = load_yaml(&upstream_file);
    let upstream_paths = upstream["paths"].as_object().expect("upstream paths");
    assert!(upstream_paths.len() >= 30, "upstream spec looks truncated");
    let ours = spec()["paths"].as_object().expect("our paths");
    for (path, item) in upstream_paths {
        let our_item = ours
            .get(path)
            .unwrap_or_else(|| panic!("upstream path {path} missing from docs/openapi.yaml"));
        for method in item.as_object().unwrap().keys() {
            assert!(our_item.get(method).is_some(), "{method} {path} missing");
        }
    }
    // Upstream's schemas are all kept (ours may only add).
    let our_schemas = spec()["components"]["schemas"].as_object().unwrap();
    for name in upstream["components"]["schemas"]
        .as_object()
        .unwrap()
        .keys()
    {
        assert!(our_schemas.contains_key(name), "schema {name} missing");
    }
}

#[test]
fn spec_and_route_table_agree() {
    let ours = spec()["paths"].as_object().expect("our paths");
    for route in ROUTES {
        let item = ours
            .get(&format!("/{}", route.op))
            .unwrap_or_else(|| panic!("route {} is not in docs/openapi.yaml", route.op));
        let methods: Vec<&String> = item.as_object().unwrap().keys().collect();
        assert_eq!(
            methods,
            vec![&route.method.as_str().to_ascii_lowercase()],
            "{}",
            route.op
        );
    }
    for path in ours.keys() {
        assert!(
            ROUTES.iter().any(|route| format!("/{}", route.op) == *path),
            "{path} is in docs/openapi.yaml but the server has no route for it"
        );
    }
}

#[test]
fn every_schema_in_our_spec_compiles() {
    for (name, _) in spec()["components"]["schemas"].as_object().unwrap() {
        compile_component(name)
            .unwrap_or_else(|error| panic!("schema {name} does not compile: {error}"));
    }
}

/// Collects every `$ref` string in `value`.
fn collect_refs<'a>(value: &'a Value, refs: &mut Vec<&'a str>) {
    match value {
        Value::Object(map) => {
            for (key, item) in map {
                match (key.as_str(), item) {
                    ("$ref", Value::String(target)) => refs.push(target),
                    _ => collect_refs(item, refs),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|item| collect_refs(item, refs)),
        _ => {}
    }
}

#[test]
fn spec_is_structurally_sound_openapi_3_0() {
    let spec = spec();
    assert!(spec["openapi"].as_str().unwrap().starts_with("3.0"));
    assert!(spec["info"]["title"].is_string() && spec["info"]["version"].is_string());
    for (path, item) in spec["paths"].as_object().unwrap() {
        assert!(path.starts_with('/'), "{path}");
        for (method, operation) in item.as_object().unwrap() {
            assert!(["get", "put"].contains(&method.as_str()), "{method} {path}");
            let responses = operation["responses"]
                .as_object()
                .unwrap_or_else(|| panic!("{method} {path} has no responses"));
            for (status, response) in responses {
                assert!(
                    status.len() == 3 && status.parse::<u16>().is_ok(),
                    "{method} {path}: status {status}"
                );
                assert!(
                    response["description"].is_string(),
                    "{method} {path} {status}"
                );
            }
        }
    }
    // Every reference points at a schema that exists.
    let mut refs = Vec::new();
    collect_refs(spec, &mut refs);
    assert!(refs.len() > 80, "only {} references found", refs.len());
    for target in refs {
        let name = target
            .strip_prefix("#/components/schemas/")
            .unwrap_or_else(|| panic!("reference {target} is not to a component schema"));
        assert!(
            spec["components"]["schemas"].get(name).is_some(),
            "dangling reference {target}"
        );
    }
}
