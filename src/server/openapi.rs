//! The OpenAPI 3 document (`GET /v1/openapi.json`), generated from the same
//! route table the app is built from.

use serde_json::{json, Map, Value};

use super::auth::Access;
use super::routes::{table, Verb};

fn path_params(path: &str) -> Vec<Value> {
    path.split('/')
        .filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
        .map(|name| {
            json!({
                "name": name,
                "in": "path",
                "required": true,
                "schema": {"type": if name == "n" { "integer" } else { "string" }},
            })
        })
        .collect()
}

fn access_note(a: Access) -> &'static str {
    match a {
        Access::Public => "No credentials needed.",
        Access::Admin => "Needs the admin API key.",
        Access::OwnSession => {
            "Needs the admin API key or a session token of the session in the path."
        }
        Access::Caller => {
            "Needs the admin API key or a session token (which reaches only its own session)."
        }
    }
}

/// The document.
pub fn document() -> Value {
    let mut paths: Map<String, Value> = Map::new();
    for spec in table() {
        let verb = match spec.verb {
            Verb::Get => "get",
            Verb::Head => "head",
            Verb::Post => "post",
            Verb::Put => "put",
            Verb::Patch => "patch",
            Verb::Delete => "delete",
        };
        let op_id = format!(
            "{verb}{}",
            spec.path
                .split(['/', '.', '{', '}'])
                .filter(|s| !s.is_empty())
                .map(|s| {
                    let mut c = s.chars();
                    c.next()
                        .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                        .unwrap_or_default()
                })
                .collect::<String>()
        );
        let mut op = json!({
            "operationId": op_id,
            "summary": spec.summary,
            "description": access_note(spec.access),
            "parameters": path_params(spec.path),
            "responses": {
                spec.status.to_string(): {"description": "Success"},
                "default": {
                    "description": "An error",
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
                },
            },
        });
        if spec.access == Access::Public {
            op["security"] = json!([]);
        }
        if let Some(example) = spec.body {
            op["requestBody"] = json!({
                "required": true,
                "content": {"application/json": {"schema": {"type": "object"}, "example": example()}},
            });
        }
        let entry = paths
            .entry(spec.path.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
        entry[verb] = op;
    }
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "troupe daemon",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Sessions that remember, over HTTP. Errors are {\"error\": {\"code\", \"message\"}}.",
        },
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "The admin API key or a session token (tt1.…)"},
            },
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {"error": {
                        "type": "object",
                        "required": ["code", "message"],
                        "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
                    }},
                },
            },
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_of_the_table_is_documented() {
        let doc = document();
        for spec in table() {
            let verb = spec.verb.as_str().to_ascii_lowercase();
            assert!(
                doc["paths"][spec.path][&verb].is_object(),
                "{spec:?} missing from the document"
            );
        }
        assert_eq!(
            doc["paths"]["/v1/sessions/{id}/versions/{n}/restore"]["post"]["parameters"][1]["name"],
            "n"
        );
    }
}
