//! Conformance to `docs/openapi.yaml`: every JSON body the tests send in an accepted request, and
//! every JSON body the server answers, is validated against the schema of its path; every
//! status the server answers with success must be one the spec lists for the path; and the spec
//! holds every upstream v53 path and every route of the server, with the same method.

use serde_json::Value;

use api_client::openapi::{compile_component, component, spec, validate};

use super::super::{VmState, ROUTES};
use super::Reply;

/// Checks one exchange made by the tests against the spec (see `api_client::openapi`).
pub fn check_exchange(method: &str, op: &str, request_body: Option<&str>, reply: &Reply) {
    if let Err(error) = api_client::openapi::check_exchange(
        method,
        op,
        request_body,
        reply.status,
        reply.body.as_bytes(),
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

/// Upstream v53's interface as data: every path with its methods and the schemas of its request
/// and success bodies, every schema with its members' names and types. Extracted once from
/// upstream's spec (facts of the interface, no prose) so a fresh clone can run this test.
fn upstream_interface() -> Value {
    serde_json::from_str(include_str!("upstream-interface.json"))
        .expect("upstream-interface.json is JSON")
}

/// The type facts of one schema (or member) of our spec, in the form of the data file.
fn type_facts(schema: &Value) -> Value {
    if let Some(target) = schema.get("$ref").and_then(Value::as_str) {
        let name = target.rsplit('/').next().unwrap_or(target);
        return serde_json::json!({ "ref": name });
    }
    let mut facts = serde_json::Map::new();
    let kind = schema
        .get("type")
        .cloned()
        .or_else(|| schema.get("properties").map(|_| Value::from("object")));
    if let Some(kind) = kind {
        facts.insert("type".into(), kind);
    }
    if let Some(items) = schema.get("items") {
        facts.insert("items".into(), type_facts(items));
    }
    if let Some(values) = schema.get("additionalProperties").filter(|v| v.is_object()) {
        facts.insert("values".into(), type_facts(values));
    }
    if let Some(values) = schema.get("enum") {
        facts.insert("enum".into(), values.clone());
    }
    Value::Object(facts)
}

fn body_facts(holder: &Value) -> Option<Value> {
    holder
        .get("content")?
        .get("application/json")?
        .get("schema")
        .map(type_facts)
}

#[test]
fn every_upstream_path_is_in_our_spec_with_its_method_and_bodies() {
    let upstream = upstream_interface();
    let upstream_paths = upstream["paths"].as_object().expect("upstream paths");
    assert_eq!(upstream_paths.len(), 31, "upstream v53 has 31 paths");
    let ours = spec()["paths"].as_object().expect("our paths");
    for (path, methods) in upstream_paths {
        let our_item = ours
            .get(path)
            .unwrap_or_else(|| panic!("upstream path {path} missing from docs/openapi.yaml"));
        for (method, bodies) in methods.as_object().unwrap() {
            let operation = our_item
                .get(method)
                .unwrap_or_else(|| panic!("{method} {path} missing"));
            if let Some(request) = bodies.get("request") {
                let our_request = operation
                    .get("requestBody")
                    .and_then(body_facts)
                    .unwrap_or_else(|| panic!("{method} {path}: no request body"));
                assert_eq!(&our_request, request, "{method} {path} request body");
            }
            if let Some(response) = bodies.get("response") {
                let our_response = body_facts(&operation["responses"]["200"])
                    .unwrap_or_else(|| panic!("{method} {path}: no 200 body"));
                assert_eq!(&our_response, response, "{method} {path} 200 body");
            }
        }
    }
}

#[test]
fn every_upstream_schema_is_kept_with_its_members_and_types() {
    let upstream = upstream_interface();
    let schemas = upstream["schemas"].as_object().expect("upstream schemas");
    assert!(schemas.len() >= 57, "upstream v53 has 57 schemas");
    let ours = spec()["components"]["schemas"].as_object().unwrap();
    for (name, facts) in schemas {
        let our = ours
            .get(name)
            .unwrap_or_else(|| panic!("schema {name} missing from docs/openapi.yaml"));
        let our_facts = type_facts(our);
        for key in ["type", "items", "values", "enum", "ref"] {
            assert_eq!(our_facts.get(key), facts.get(key), "schema {name}: {key}");
        }
        if let Some(members) = facts.get("members").and_then(Value::as_object) {
            let our_members = our["properties"]
                .as_object()
                .unwrap_or_else(|| panic!("schema {name} has no members"));
            for (member, member_facts) in members {
                let our_member = our_members
                    .get(member)
                    .unwrap_or_else(|| panic!("schema {name}: member {member} missing"));
                assert_eq!(&type_facts(our_member), member_facts, "{name}.{member}");
            }
        }
        if let Some(required) = facts.get("required") {
            let mut ours: Vec<Value> = our["required"].as_array().cloned().unwrap_or_default();
            ours.sort_by_key(|v| v.to_string());
            // We may require less than upstream never more: a body upstream's ch-remote sends
            // must be accepted.
            for name_required in ours.iter() {
                assert!(
                    required.as_array().unwrap().contains(name_required),
                    "schema {name}: we require {name_required}, upstream does not"
                );
            }
        }
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

/// The hotplug endpoints this VMM implements answer what upstream v53 documents for them:
/// 200/204 success, 400 bad body, 404 no VM, 409 id in use, 500 setup failure (`vm.add-fs`
/// once listed only 200/204/400/500/501, and answered an undocumented 404 without a VM).
#[test]
fn implemented_hotplug_endpoints_document_upstreams_statuses() {
    let paths = &spec()["paths"];
    for path in ["/vm.add-disk", "/vm.add-net", "/vm.add-fs"] {
        let responses = paths[path]["put"]["responses"]
            .as_object()
            .unwrap_or_else(|| panic!("{path}: no responses"));
        let mut statuses: Vec<&str> = responses.keys().map(String::as_str).collect();
        statuses.sort_unstable();
        assert_eq!(
            statuses,
            ["200", "204", "400", "404", "409", "500"],
            "PUT {path}"
        );
    }
}
