//! API Management: no API fronts the broker, the fragment works as shipped in caller mode
//! `none` and has a `jwt` variant, no variable holds a `JObject`, caching is claimed only where a
//! cache exists, and the function key cannot be left out or drift with each redeploy.

use std::collections::BTreeSet;

use crate::bicep::{self, Declaration};
use crate::read;

const FRAGMENT: &str = "infra/apim/token-broker-fragment.xml";
const FRAGMENT_JWT: &str = "infra/apim/token-broker-fragment-jwt.xml";

/// Every policy document under `infra/apim/`.
fn policy_files() -> Vec<String> {
    let mut files: Vec<String> = std::fs::read_dir(crate::root().join("infra/apim"))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .filter(|name| name.ends_with(".xml"))
        .map(|name| format!("infra/apim/{name}"))
        .collect();
    files.sort();
    assert!(files.len() >= 2, "{files:?}");
    files
}

/// Elements of a policy document named `name`, with their attributes and text.
fn elements(text: &str, name: &str) -> Vec<(Vec<(String, String)>, String)> {
    let document = roxmltree::Document::parse(text).expect("well-formed XML");
    document
        .descendants()
        .filter(|node| node.tag_name().name() == name)
        .map(|node| {
            let attributes = node
                .attributes()
                .map(|a| (a.name().to_string(), a.value().to_string()))
                .collect();
            (attributes, node.text().unwrap_or_default().to_string())
        })
        .collect()
}

fn attribute<'a>(attributes: &'a [(String, String)], name: &str) -> Option<&'a str> {
    attributes
        .iter()
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.as_str())
}

/// The policy files a Bicep declaration loads with `loadTextContent`.
fn loaded_files(resource: &Declaration) -> Vec<String> {
    let text = std::fs::read_to_string(&resource.file).unwrap();
    let mut loaded = Vec::new();
    for piece in text.split("loadTextContent('").skip(1) {
        let relative = piece.split('\'').next().unwrap();
        let path = resource.file.parent().unwrap().join(relative);
        let path = path
            .canonicalize()
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let path = path
            .strip_prefix(crate::root().canonicalize().unwrap())
            .unwrap();
        loaded.push(path.to_string_lossy().into_owned());
    }
    loaded
}

#[test]
fn no_api_management_api_fronts_the_broker() {
    assert!(
        !crate::root()
            .join("infra/apim/broker-api-policy.xml")
            .exists(),
        "the policy of the broker-as-API is gone"
    );
    let apis = bicep::resources_of("Microsoft.ApiManagement/service/apis");
    for api in &apis {
        for broker_marker in [
            "brokerUrl",
            "token-broker-url",
            "defaultHostName",
            "azurewebsites.net",
            "openapi.yaml",
            "format: 'openapi",
        ] {
            assert!(
                !api.body.contains(broker_marker),
                "{} imports or points at the broker ({broker_marker})",
                api.describe()
            );
        }
    }
    // Only the fragments carry the function key or name the broker; an API's own policy
    // includes the fragment instead.
    for file in policy_files() {
        let text = read(&file);
        let is_fragment = file == FRAGMENT || file == FRAGMENT_JWT;
        if !is_fragment {
            for marker in [
                "token-broker-function-key",
                "token-broker-url",
                "x-functions-key",
            ] {
                assert!(!text.contains(marker), "{file} uses {marker}");
            }
            assert!(
                elements(&text, "set-backend-service").is_empty(),
                "{file} re-points the backend"
            );
        }
    }
    // The sample backend API exists and gets its token through the fragment.
    let sample_policy = bicep::resources_of("Microsoft.ApiManagement/service/apis/policies");
    assert_eq!(sample_policy.len(), 1, "{sample_policy:?}");
    let loaded = loaded_files(&sample_policy[0]);
    let sample_files: Vec<&String> = loaded.iter().filter(|f| f.contains("sample-")).collect();
    assert_eq!(sample_files.len(), 2, "{loaded:?}");
    for file in sample_files {
        let text = read(file);
        let includes = elements(&text, "include-fragment");
        assert!(!includes.is_empty(), "{file}");
        for (attributes, _) in &includes {
            assert_eq!(attribute(attributes, "fragment-id"), Some("token-broker"));
        }
        let connection = elements(&text, "set-variable")
            .into_iter()
            .find(|(a, _)| attribute(a, "name") == Some("tokenBrokerConnection"))
            .and_then(|(a, _)| attribute(&a, "value").map(str::to_string))
            .expect("the sample names its connection");
        assert!(
            read("infra/broker.toml").contains(&format!("[connections.{connection}]")),
            "{file}: the shipped broker.toml has no connection {connection}"
        );
    }
    assert_eq!(apis.len(), 1, "only the sample API: {apis:?}");
    assert!(apis[0].header.contains("if (!empty(sampleBackendUrl))"));
}

#[test]
fn the_fragment_in_caller_mode_none_has_no_managed_identity_element() {
    let none = read(FRAGMENT);
    assert!(
        elements(&none, "authentication-managed-identity").is_empty(),
        "{FRAGMENT} asks for a managed identity token, which fails without an app registration"
    );
    assert!(!none.contains("{{token-broker-audience}}"));

    // The jwt variant adds exactly that element, for the audience named value, inside each
    // request to the broker (the invalidation and the token), and differs in nothing else.
    let jwt = read(FRAGMENT_JWT);
    let managed_identity = elements(&jwt, "authentication-managed-identity");
    assert_eq!(managed_identity.len(), 2);
    for (attributes, _) in &managed_identity {
        assert_eq!(
            attribute(attributes, "resource"),
            Some("{{token-broker-audience}}")
        );
    }
    let document = roxmltree::Document::parse(&jwt).unwrap();
    for element in document
        .descendants()
        .filter(|n| n.tag_name().name() == "authentication-managed-identity")
    {
        assert_eq!(element.parent().unwrap().tag_name().name(), "send-request");
    }
    let strip = |text: &str| -> Vec<String> {
        let body = &text[text.find("<fragment>").expect("a fragment element")..];
        body.lines()
            .map(str::trim)
            .filter(|line| !line.starts_with("<authentication-managed-identity"))
            .map(str::to_string)
            .collect()
    };
    assert_eq!(strip(&none), strip(&jwt), "the two variants drifted apart");

    // The Bicep picks the variant by the broker's caller mode, and creates the audience named
    // value only for the jwt variant.
    let wiring = read("infra/modules/apim-wiring.bicep");
    assert!(wiring.contains(
        "callerMode == 'jwt' ? loadTextContent('../apim/token-broker-fragment-jwt.xml') : loadTextContent('../apim/token-broker-fragment.xml')"
    ));
    let audience = bicep::resources_of("Microsoft.ApiManagement/service/namedValues")
        .into_iter()
        .find(|r| r.body.contains("name: 'token-broker-audience'"))
        .expect("the audience named value");
    assert!(audience.header.contains("if (callerMode == 'jwt')"));
    assert!(
        bicep::param("infra/apim.bicep", "brokerCallerMode")
            .contains("param brokerCallerMode string = 'none'")
    );
}

#[test]
fn every_named_value_a_policy_uses_is_created() {
    let created: BTreeSet<String> =
        bicep::resources_of("Microsoft.ApiManagement/service/namedValues")
            .iter()
            .map(|r| r.property("name").unwrap().trim_matches('\'').to_string())
            .collect();
    for file in policy_files() {
        let text = read(&file);
        for used in text.split("{{").skip(1) {
            let name = used.split("}}").next().unwrap();
            assert!(
                created.contains(name),
                "{file} uses {{{{{name}}}}}, which no template creates: {created:?}"
            );
        }
    }
}

/// True when a policy expression `@(...)` can only evaluate to a basic type: it starts with a
/// cast to one, or reads a variable through `GetValueOrDefault<basic>`, or is a string built
/// with `+`; and no `JObject` is what it returns.
fn returns_a_basic_type(expression: &str) -> bool {
    let Some(inner) = expression
        .strip_prefix("@(")
        .and_then(|rest| rest.strip_suffix(')'))
    else {
        // A literal value.
        return !expression.contains('@');
    };
    let basic_casts = [
        "(string)",
        "(int)",
        "(long)",
        "(bool)",
        "(double)",
        "(decimal)",
        "(DateTime)",
    ];
    let cast = basic_casts.iter().any(|cast| inner.starts_with(cast));
    let string_literal_concatenation = inner.starts_with('"') && inner.contains('+');
    let basic_read = ["<string>", "<int>", "<bool>"].iter().any(|t| {
        inner.starts_with(&format!("context.Variables.GetValueOrDefault{t}"))
            && !inner.contains("JObject")
    });
    // A JObject may be parsed inside, but only to index into it.
    let jobject_indexed = inner.match_indices("As<JObject>(").all(|(at, _)| {
        let after = &inner[at..];
        let close = after.find(')').unwrap();
        after[close + 1..].starts_with('[')
    });
    (cast || string_literal_concatenation || basic_read) && jobject_indexed
}

#[test]
fn no_set_variable_returns_a_jobject() {
    let mut checked = 0;
    for file in policy_files() {
        for (attributes, _) in elements(&read(&file), "set-variable") {
            let value = attribute(&attributes, "value").unwrap();
            assert!(
                returns_a_basic_type(value),
                "{file}: set-variable {} = {value} may return a JObject",
                attribute(&attributes, "name").unwrap()
            );
            checked += 1;
        }
    }
    assert!(checked >= 4, "{checked}");
    // The checker itself refuses what the fragment used to do.
    assert!(!returns_a_basic_type(
        r#"@(((IResponse)context.Variables["tokenBrokerResponse"]).Body.As<JObject>())"#
    ));
    assert!(!returns_a_basic_type(
        r#"@((JObject)context.Variables["tokenBrokerBody"])"#
    ));
    assert!(returns_a_basic_type(
        r#"@((string)context.Variables.GetValueOrDefault<IResponse>("r").Body.As<JObject>(preserveContent: true)["access_token"])"#
    ));
}

#[test]
fn a_cache_miss_is_tested_with_get_value_or_default_and_the_fragment_does_not_cache() {
    for file in [FRAGMENT, FRAGMENT_JWT] {
        let text = read(file);
        for cache_policy in ["cache-lookup-value", "cache-store-value"] {
            assert!(
                elements(&text, cache_policy).is_empty(),
                "{file}: {cache_policy} is not supported inside a policy fragment"
            );
        }
        let conditions: Vec<String> = elements(&text, "when")
            .into_iter()
            .filter_map(|(a, _)| attribute(&a, "condition").map(str::to_string))
            .collect();
        let token_missing = r#"string.IsNullOrEmpty(context.Variables.GetValueOrDefault<string>("tokenBrokerAccessToken"))"#;
        assert!(
            conditions.iter().any(|c| c.contains(token_missing)),
            "{file}: {conditions:?}"
        );
        assert!(
            !text.contains("ContainsKey(") && !text.contains("Variables[\""),
            "{file}: variables are read with GetValueOrDefault"
        );
        // The fragment tells an including policy how long the token lives.
        assert!(
            elements(&text, "set-variable")
                .iter()
                .any(|(a, _)| attribute(a, "name") == Some("tokenBrokerExpiresIn"))
        );
    }
    // Caching happens only in the cached sample policy, which is used only on an existing
    // instance (a new one is Consumption, without a cache).
    for file in policy_files() {
        let text = read(&file);
        let caches = !elements(&text, "cache-lookup-value").is_empty()
            || !elements(&text, "cache-store-value").is_empty();
        assert_eq!(caches, file.ends_with("-cached.xml"), "{file}");
    }
    let apim = read("infra/apim.bicep");
    assert!(apim.contains("sampleTokenCaching: apimMode == 'existing' && sampleTokenCaching"));
    let instance = read("infra/modules/apim-instance.bicep");
    assert!(instance.contains("sku: { name: 'Consumption', capacity: 0 }"));
}

#[test]
fn api_management_cannot_be_wired_without_a_function_key_and_its_expiry_is_pinned() {
    let key = bicep::param("infra/apim.bicep", "functionKey");
    assert!(key.contains("@secure()"), "{key}");
    let min_length: u32 = key
        .split("@minLength(")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("functionKey has no @minLength: {key}"));
    assert!(min_length >= 32, "{key}");
    assert!(
        key.trim_end().ends_with("param functionKey string"),
        "functionKey must have no default: {key}"
    );
    let expiry = bicep::param("infra/apim.bicep", "functionKeyExpiry");
    assert!(
        expiry
            .trim_end()
            .ends_with("param functionKeyExpiry string"),
        "the expiry is given, not computed: {expiry}"
    );
    for file in bicep::files() {
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(
            !text.contains("utcNow("),
            "{}: utcNow() changes the template's output on every deployment",
            file.display()
        );
    }
    // Two host keys alternate for a roll; the module writes only the one named.
    let name = bicep::param("infra/apim.bicep", "functionKeyName");
    assert!(name.contains("@allowed(['apim-a', 'apim-b'])"), "{name}");
    let host_keys = bicep::resources_of("Microsoft.Web/sites/host/functionKeys");
    assert_eq!(host_keys.len(), 1);
    assert!(host_keys[0].body.contains("${functionKeyName}"));
    assert!(
        !host_keys[0].header.contains(" if "),
        "the key is written whenever API Management is wired"
    );
    // The Key Vault secret holds the same key with that pinned expiry, and API Management's
    // named value follows its latest version (no version in the identifier).
    let secret = bicep::resources_of("Microsoft.KeyVault/vaults/secrets")
        .into_iter()
        .find(|r| r.body.contains("name: 'broker-function-key'"))
        .expect("the function key secret");
    assert!(secret.body.contains("value: functionKey"));
    assert!(secret.body.contains("exp: functionKeyExpiry"));
    let access = read("infra/modules/apim-broker-access.bicep");
    assert!(access.contains(
        "output secretUri string = '${vault.properties.vaultUri}secrets/${functionKeySecret.name}'"
    ));
}

#[test]
fn the_apim_principal_comes_from_the_created_or_the_existing_instance() {
    for resource in bicep::resources() {
        if resource.is_existing() {
            assert!(
                resource.property("dependsOn").is_none(),
                "{}: an existing resource with dependsOn needs a recent Bicep",
                resource.describe()
            );
        }
    }
    let apim = read("infra/apim.bicep");
    assert!(apim.contains(
        "apimPrincipalId: apimMode == 'new' ? instance.outputs.principalId : existingInstance.identity.principalId"
    ));
    let principal = bicep::param("infra/modules/apim-broker-access.bicep", "apimPrincipalId");
    assert!(principal.contains("@minLength(36)"), "{principal}");
    let instance = read("infra/modules/apim-instance.bicep");
    assert!(instance.contains("identity: { type: 'SystemAssigned' }"));
    assert!(instance.contains("output principalId string = service.identity.principalId"));
}

#[test]
fn the_fragment_uses_the_brokers_route_and_answer_fields() {
    for file in [FRAGMENT, FRAGMENT_JWT] {
        let text = read(file);
        let url = &elements(&text, "set-url")[0].1;
        assert!(url.contains("{{token-broker-url}}/api/token/"), "{url}");
        assert!(url.contains("Uri.EscapeDataString("), "{url}");
        let headers: Vec<String> = elements(&text, "set-header")
            .iter()
            .filter_map(|(a, _)| attribute(a, "name").map(str::to_string))
            .collect();
        assert!(headers.contains(&"x-functions-key".to_string()));
        assert!(headers.contains(&"Authorization".to_string()));
        assert!(text.contains("[\"access_token\"]") && text.contains("[\"expires_in\"]"));
        let status = attribute(&elements(&text, "set-status")[0].0, "code")
            .unwrap()
            .to_string();
        assert!(status.contains("502") && status.contains("503"), "{status}");
        assert!(
            !text.contains("Body.As<string>"),
            "never passes the broker's body on"
        );
    }
    let openapi = read("openapi.yaml");
    assert!(openapi.contains("/api/token/{connection}:"));
    assert!(openapi.contains("required: [access_token, token_type, expires_in, expires_on]"));
    // Policies are sent as XML (the files are well-formed, with `&lt;` in expressions).
    let mut policies = 0;
    for resource in bicep::resources() {
        if resource.target.ends_with("/policies") || resource.target.ends_with("/policyFragments") {
            policies += 1;
            assert_eq!(
                resource.property("format").as_deref(),
                Some("'xml'"),
                "{}",
                resource.describe()
            );
        }
    }
    assert_eq!(policies, 2, "the fragment and the sample API's policy");
}

#[test]
fn the_sample_backend_policies_retry_a_backend_401_once_after_invalidating_the_refused_token() {
    for file in [
        "infra/apim/sample-backend-policy.xml",
        "infra/apim/sample-backend-policy-cached.xml",
    ] {
        let text = read(file);
        let document = roxmltree::Document::parse(&text).unwrap();
        let backend = document
            .descendants()
            .find(|node| node.has_tag_name("backend"))
            .unwrap();
        let retries: Vec<_> = backend
            .descendants()
            .filter(|node| node.has_tag_name("retry"))
            .collect();
        assert_eq!(retries.len(), 1, "{file}: one retry");
        let retry = retries[0];
        assert_eq!(retry.attribute("count"), Some("1"), "{file}: once");
        assert_eq!(retry.attribute("interval"), Some("0"), "{file}");
        let condition = retry.attribute("condition").unwrap();
        assert!(
            condition.contains("StatusCode == 401"),
            "{file}: {condition}"
        );
        // In order: a new token through the fragment (which invalidates the refused one),
        // then the request forwarded again, its body buffered for the resend.
        let order: Vec<&str> = retry
            .descendants()
            .filter(|node| {
                ["include-fragment", "forward-request"].contains(&node.tag_name().name())
            })
            .map(|node| node.tag_name().name())
            .collect();
        assert_eq!(order, ["include-fragment", "forward-request"], "{file}");
        let forward = retry
            .descendants()
            .find(|node| node.has_tag_name("forward-request"))
            .unwrap();
        assert_eq!(forward.attribute("buffer-request-body"), Some("true"));
        // Only after the first attempt: the refused token handed to the fragment, the
        // current one cleared so that the fragment fetches.
        let branch = retry
            .descendants()
            .find(|node| node.has_tag_name("include-fragment"))
            .unwrap()
            .parent()
            .unwrap();
        assert!(
            branch
                .attribute("condition")
                .unwrap()
                .contains("GetValueOrDefault<int>(\"tokenBrokerAttempts\", 0) > 0"),
            "{file}"
        );
        let sets: Vec<(&str, &str)> = branch
            .children()
            .filter(|node| node.has_tag_name("set-variable"))
            .map(|node| {
                (
                    node.attribute("name").unwrap(),
                    node.attribute("value").unwrap(),
                )
            })
            .collect();
        assert_eq!(
            sets,
            [
                (
                    "tokenBrokerRefusedToken",
                    "@(context.Variables.GetValueOrDefault<string>(\"tokenBrokerAccessToken\", \"\"))"
                ),
                ("tokenBrokerAccessToken", "")
            ],
            "{file}"
        );
        if file.ends_with("-cached.xml") {
            assert!(
                branch
                    .children()
                    .any(|node| node.has_tag_name("cache-remove-value")),
                "{file}: the refused token leaves API Management's cache too"
            );
        }
    }
    // The fragments invalidate a refused token before they ask for one.
    for file in [FRAGMENT, FRAGMENT_JWT] {
        let text = read(file);
        let document = roxmltree::Document::parse(&text).unwrap();
        let sends: Vec<_> = document
            .descendants()
            .filter(|node| node.has_tag_name("send-request"))
            .collect();
        assert_eq!(sends.len(), 2, "{file}");
        let child = |send: roxmltree::Node, name: &str| {
            send.children()
                .find(|node| node.has_tag_name(name))
                .and_then(|node| node.text())
                .unwrap_or_default()
                .to_string()
        };
        let (invalidation, token) = (sends[0], sends[1]);
        assert!(
            child(invalidation, "set-url").ends_with("+ \"/invalidate\")"),
            "{file}"
        );
        assert_eq!(child(invalidation, "set-method"), "POST");
        assert_eq!(child(token, "set-method"), "GET");
        let body = child(invalidation, "set-body");
        assert!(
            body.starts_with("@(\"access_token=\" + Uri.EscapeDataString(")
                && body.contains("tokenBrokerRefusedToken"),
            "{file}: the refused token, form-encoded: {body}"
        );
        assert_eq!(
            invalidation
                .descendants()
                .any(|node| node.has_tag_name("authentication-managed-identity")),
            file == FRAGMENT_JWT,
            "{file}: authenticated as the token request is"
        );
    }
}
