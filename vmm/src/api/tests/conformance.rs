//! Conformance to `docs/openapi.yaml`: every JSON body the tests send in an accepted request, and
//! every JSON body the server answers, is validated against the schema of its path; every
//! status the server answers with success must be one the spec lists for the path; and the spec
//! holds every upstream v53 path and every route of the server, with the same method.

use std::path::PathBuf;
use std::sync::OnceLock;

use serde_json::{json, Value};

use super::super::{VmState, ROUTES};
use super::Reply;

fn repository_file(relative: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(relative)
}

/// Parses an OpenAPI YAML document into JSON (status keys such as `200:` become strings).
fn load_yaml(path: &PathBuf) -> Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|error| panic!("cannot read {}: {error}", path.display()));
    let yaml: serde_yaml::Value = serde_yaml::from_str(&text)
        .unwrap_or_else(|error| panic!("{} is not valid YAML: {error}", path.display()));
    serde_json::to_value(yaml).expect("YAML maps to JSON")
}

fn spec() -> &'static Value {
    static SPEC: OnceLock<Value> = OnceLock::new();
    SPEC.get_or_init(|| load_yaml(&repository_file("docs/openapi.yaml")))
}

/// The operation object of `op` (without query) and `method`, if the spec has one.
fn operation(method: &str, op: &str) -> Option<&'static Value> {
    let path = format!("/{}", op.split('?').next().unwrap_or(op));
    spec()["paths"].get(&path)?.get(method.to_ascii_lowercase())
}

/// Validates `instance` against `schema`, resolving `#/components/...` in the spec. OpenAPI 3.0
/// schemas are a JSON Schema draft 4 dialect (`$ref` siblings ignored, boolean
/// `exclusiveMinimum`), so draft 4 it is; OpenAPI-only keywords (`nullable`, `example`) are
/// ignored by the validator.
pub fn validate(schema: &Value, instance: &Value) -> Result<(), String> {
    let mut root = schema.clone();
    root["components"] = spec()["components"].clone();
    let validator =
        jsonschema::draft4::new(&root).map_err(|error| format!("bad schema: {error}"))?;
    let errors: Vec<String> = validator
        .iter_errors(instance)
        .map(|error| format!("{} at {}", error, error.instance_path()))
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}

fn json_schema_of(content_holder: &Value) -> Option<&Value> {
    content_holder
        .get("content")?
        .get("application/json")?
        .get("schema")
}

/// Checks one exchange made by the tests. Error answers (4xx/5xx) are plain text and not
/// described by upstream's spec; what matters for them is the status, which the tests assert.
pub fn check_exchange(method: &str, op: &str, request_body: Option<&str>, reply: &Reply) {
    if !(200..300).contains(&reply.status) {
        return;
    }
    let operation = operation(method, op)
        .unwrap_or_else(|| panic!("{method} /{op} succeeded but is not in docs/openapi.yaml"));
    if let (Some(body), Some(schema)) = (
        request_body,
        operation.get("requestBody").and_then(json_schema_of),
    ) {
        let instance: Value = serde_json::from_str(body).expect("accepted bodies are JSON");
        if let Err(error) = validate(schema, &instance) {
            panic!("request body of {method} /{op} does not match the spec: {error}\n{body}");
        }
    }
    let status = reply.status.to_string();
    let response = operation["responses"].get(&status).unwrap_or_else(|| {
        panic!("{method} /{op} answered {status}, which the spec does not list")
    });
    match json_schema_of(response) {
        Some(schema) => {
            let instance = reply.json();
            if let Err(error) = validate(schema, &instance) {
                panic!("response of {method} /{op} does not match the spec: {error}\n{instance}");
            }
        }
        None => assert!(
            reply.body.is_empty(),
            "{method} /{op} answered a body the spec does not describe"
        ),
    }
}

fn component(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

#[test]
fn the_validator_rejects_what_the_spec_forbids() {
    // Guards the checks above against passing vacuously (a schema that accepts anything).
    assert!(validate(&component("VmInfo"), &json!({"state": "Running"})).is_err());
    assert!(validate(
        &component("VmInfo"),
        &json!({"state": "Bogus", "config": {"payload": {}}})
    )
    .is_err());
    assert!(validate(&component("VmmPingResponse"), &json!({"pid": 1})).is_err());
    assert!(validate(&component("NvStatus"), &json!({"region": "/r"})).is_err());
    assert!(validate(
        &component("NvRecoverConfig"),
        &json!({"region": "/r", "vm": "a", "extra": 1})
    )
    .is_err());
    assert!(validate(
        &component("VmCounters"),
        &json!({"disk": {"reads": "many"}})
    )
    .is_err());
    assert!(validate(&component("VmState"), &json!("Paused")).is_ok());
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
    let upstream_file = repository_file("../shared/reference/cloud-hypervisor-v53-openapi.yaml");
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
        let mut root = component(name);
        root["components"] = spec()["components"].clone();
        jsonschema::draft4::new(&root)
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
