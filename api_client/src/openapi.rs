//! Conformance to `docs/openapi.yaml` (the upstream cloud-hypervisor v53 spec plus our NV
//! endpoints), shared by every test that talks to the API: the server's own tests in the `vmm`
//! crate and the end-to-end tests here. A JSON body sent in an accepted request and every JSON
//! body answered are validated against the schema of their path; a success status must be one
//! the spec lists for the path.
//!
//! OpenAPI 3.0 schemas are a JSON Schema draft 4 dialect (`$ref` siblings ignored, boolean
//! `exclusiveMinimum`), so they are checked with a draft 4 validator; `nullable: true` is turned
//! into its draft 4 form first, other OpenAPI-only keywords (`example`) are ignored.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde_json::{json, Value};

/// A file of the workspace, by its path relative to the workspace root.
pub fn workspace_file(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(relative)
}

/// Parses an OpenAPI YAML document into JSON (status keys such as `200:` become strings).
pub fn load_yaml(path: &Path) -> Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|error| panic!("cannot read {}: {error}", path.display()));
    let yaml: serde_yaml::Value = serde_yaml::from_str(&text)
        .unwrap_or_else(|error| panic!("{} is not valid YAML: {error}", path.display()));
    serde_json::to_value(yaml).expect("YAML maps to JSON")
}

/// `docs/openapi.yaml`, parsed once.
pub fn spec() -> &'static Value {
    static SPEC: OnceLock<Value> = OnceLock::new();
    SPEC.get_or_init(|| load_yaml(&workspace_file("docs/openapi.yaml")))
}

/// The operation object of `op` (a query is ignored) and `method`, if the spec has one.
pub fn operation(method: &str, op: &str) -> Option<&'static Value> {
    let path = format!("/{}", op.split('?').next().unwrap_or(op));
    spec()["paths"].get(&path)?.get(method.to_ascii_lowercase())
}

/// A `$ref` to the component schema `name`.
pub fn component(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

fn compile(schema: &Value) -> Result<jsonschema::Validator, String> {
    let mut root = schema.clone();
    root["components"] = spec()["components"].clone();
    allow_nullable(&mut root);
    jsonschema::draft4::new(&root).map_err(|error| format!("bad schema: {error}"))
}

/// OpenAPI 3.0's `nullable: true` in draft 4 terms: `type: T` becomes `type: [T, "null"]`.
fn allow_nullable(schema: &mut Value) {
    match schema {
        Value::Object(members) => {
            if members.get("nullable") == Some(&Value::Bool(true)) {
                if let Some(Value::String(kind)) = members.get("type").cloned() {
                    members.insert("type".to_owned(), json!([kind, "null"]));
                }
            }
            members.values_mut().for_each(allow_nullable);
        }
        Value::Array(items) => items.iter_mut().for_each(allow_nullable),
        _ => {}
    }
}

/// Checks that the component schema `name` compiles (its references resolve).
pub fn compile_component(name: &str) -> Result<(), String> {
    compile(&component(name)).map(drop)
}

/// Validates `instance` against `schema`, resolving `#/components/...` in the spec.
pub fn validate(schema: &Value, instance: &Value) -> Result<(), String> {
    let validator = compile(schema)?;
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

/// Statuses of the HTTP layer any path may answer (time, size and connection limits, a VMM
/// shutting down): described once in docs/api.md, not per path.
const ANY_PATH_STATUSES: &[u16] = &[408, 413, 431, 503, 504];

/// Parses an error body as upstream's ch-remote does: a JSON array of strings, at least one.
pub fn error_messages(body: &[u8]) -> Result<Vec<String>, String> {
    let messages: Vec<String> = serde_json::from_slice(body).map_err(|error| {
        format!(
            "error body is not a JSON array of strings ({error}): {}",
            String::from_utf8_lossy(body)
        )
    })?;
    if messages.is_empty() {
        return Err("error body is an empty array".into());
    }
    Ok(messages)
}

/// Checks one exchange: `method /op` with `request_body` answered `status` with
/// `response_body`. An error answer must be a JSON array of strings; when it comes from the
/// operation (the control loop, or a body it refused) its status must be one the spec lists for
/// the path; routing answers (`["Not Found"]`, `["Bad Request"]` for a wrong method) and the
/// HTTP layer's limits are not per path. For a success, the request body (when the operation
/// takes one), the status and the response body must all be what the spec says.
pub fn check_exchange(
    method: &str,
    op: &str,
    request_body: Option<&str>,
    status: u16,
    response_body: &[u8],
) -> Result<(), String> {
    if status >= 400 {
        let messages = error_messages(response_body)?;
        let from_operation = messages.len() > 1 && !ANY_PATH_STATUSES.contains(&status);
        if from_operation && operation(method, op).is_some() {
            check_error_status(method, op, status)?;
        }
        return Ok(());
    }
    let operation = operation(method, op)
        .ok_or_else(|| format!("{method} /{op} succeeded but is not in docs/openapi.yaml"))?;
    if let (Some(body), Some(schema)) = (
        request_body,
        operation.get("requestBody").and_then(json_schema_of),
    ) {
        let instance: Value = serde_json::from_str(body)
            .map_err(|error| format!("{method} /{op} accepted a body that is not JSON: {error}"))?;
        validate(schema, &instance).map_err(|error| {
            format!("request body of {method} /{op} does not match the spec: {error}\n{body}")
        })?;
    }
    let response = operation["responses"]
        .get(status.to_string())
        .ok_or_else(|| format!("{method} /{op} answered {status}, which the spec does not list"))?;
    match json_schema_of(response) {
        Some(schema) => {
            let instance: Value = serde_json::from_slice(response_body).map_err(|error| {
                format!("{method} /{op} answered {status} with a body that is not JSON: {error}")
            })?;
            validate(schema, &instance).map_err(|error| {
                format!("response of {method} /{op} does not match the spec: {error}\n{instance}")
            })
        }
        None if response_body.is_empty() => Ok(()),
        None => Err(format!(
            "{method} /{op} answered a body the spec does not describe"
        )),
    }
}

/// Checks that an error answer's `status` to `method /op` is one the spec lists for it, so
/// that what an operator reads in `docs/openapi.yaml` is what the VMM answers.
pub fn check_error_status(method: &str, op: &str, status: u16) -> Result<(), String> {
    let operation = operation(method, op)
        .ok_or_else(|| format!("{method} /{op} is not in docs/openapi.yaml"))?;
    if operation["responses"].get(status.to_string()).is_some() {
        Ok(())
    } else {
        Err(format!(
            "{method} /{op} answered {status}, which docs/openapi.yaml does not list for it"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_status_must_be_listed() {
        assert!(check_error_status("PUT", "vm.nv-recover", 409).is_ok());
        assert!(check_error_status("PUT", "vm.nv-recover", 418).is_err());
        assert!(check_error_status("GET", "vmm.nv-regions?region=/r", 404).is_ok());
        assert!(check_error_status("PUT", "vm.no-such-path", 404).is_err());
    }

    #[test]
    fn a_success_must_match_the_spec() {
        assert!(check_exchange("GET", "vmm.ping", None, 200, br#"{"pid":1}"#).is_err());
        assert!(check_exchange(
            "GET",
            "vmm.ping",
            None,
            200,
            br#"{"build_version":"1","version":"1","pid":1,"features":[]}"#
        )
        .is_ok());
        assert!(check_exchange("PUT", "vm.pause", None, 204, b"").is_ok());
        assert!(check_exchange("PUT", "vm.pause", None, 204, b"{}").is_err());
        assert!(check_exchange("PUT", "vm.nosuch", None, 204, b"").is_err());
        assert!(check_exchange(
            "PUT",
            "vm.snapshot",
            Some(r#"{"destination_url":1}"#),
            204,
            b""
        )
        .is_err());
        // Errors are JSON arrays of strings, with a status the spec lists for the path.
        assert!(check_exchange("PUT", "vm.pause", None, 500, b"not booted").is_err());
        assert!(check_exchange("PUT", "vm.pause", None, 500, br#"["a","b"]"#).is_ok());
        assert!(check_exchange("PUT", "vm.pause", None, 405, br#"["a","b"]"#).is_err());
        assert!(check_exchange("PUT", "vm.pause", None, 500, b"[]").is_err());
        assert!(check_exchange("GET", "vm.pause", None, 400, br#"["Bad Request"]"#).is_ok());
    }
}
