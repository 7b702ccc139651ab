//! The GitLab simulator over loopback HTTP: every rule of `gitlab-api/SEMANTICS.md` with its
//! status code and body, pagination, keyset links, connection tests, faults, request
//! counts, control endpoints, concurrency and `serve`.

use std::time::Duration;

use gitlab_registry_operator::sim::upstream_stub::{StubBehaviour, UpstreamStub};
use gitlab_registry_operator::sim::{self, FaultSpec, Seed, SimConfig, SimHandle, Simulator};
use reqwest::Method;
use reqwest::header::HeaderMap;
use serde_json::{Value, json};

const TOKEN: &str = "test-token";
const VR: &str = "/virtual_registries/container";

struct Api {
    http: reqwest::Client,
    sim: SimHandle,
}

struct Reply {
    status: u16,
    headers: HeaderMap,
    body: Value,
}

impl Reply {
    fn header(&self, name: &str) -> String {
        self.headers
            .get(name)
            .and_then(|value| value.to_str().ok())
            .unwrap_or("<none>")
            .to_owned()
    }
}

async fn start(config: SimConfig, seed: Seed) -> Api {
    let sim = Simulator::start(config, seed)
        .await
        .expect("simulator starts");
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client");
    Api { http, sim }
}

fn config() -> SimConfig {
    SimConfig::with_token(TOKEN)
}

async fn demo() -> Api {
    start(config(), Seed::demo()).await
}

impl Api {
    async fn send(&self, request: reqwest::RequestBuilder) -> Reply {
        let response = request.send().await.expect("request answered");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let text = response.text().await.expect("body");
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        Reply {
            status,
            headers,
            body,
        }
    }

    fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.sim.api_url()))
            .header("PRIVATE-TOKEN", TOKEN)
    }

    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> Reply {
        let mut request = self.request(method, path);
        if let Some(body) = body {
            request = request.json(&body);
        }
        self.send(request).await
    }

    async fn get(&self, path: &str) -> Reply {
        self.call(Method::GET, path, None).await
    }

    async fn post(&self, path: &str, body: Value) -> Reply {
        self.call(Method::POST, path, Some(body)).await
    }

    async fn patch(&self, path: &str, body: Value) -> Reply {
        self.call(Method::PATCH, path, Some(body)).await
    }

    async fn delete(&self, path: &str) -> Reply {
        self.call(Method::DELETE, path, None).await
    }

    async fn control(&self, method: Method, path: &str, body: Option<Value>) -> Reply {
        let mut request = self
            .http
            .request(method, format!("{}/-/sim{path}", self.sim.base_url()));
        if let Some(body) = body {
            request = request.json(&body);
        }
        self.send(request).await
    }

    async fn create_registry(&self, group: &str, name: &str) -> u64 {
        let reply = self
            .post(
                &format!("/groups/{group}/-/virtual_registries/container/registries"),
                json!({"name": name}),
            )
            .await;
        assert_eq!(reply.status, 201, "{:?}", reply.body);
        reply.body["id"].as_u64().expect("id")
    }

    async fn create_upstream(&self, registry: u64, name: &str, url: &str) -> Reply {
        self.post(
            &format!("{VR}/registries/{registry}/upstreams"),
            json!({"name": name, "url": url}),
        )
        .await
    }
}

fn upstream_id(reply: &Reply) -> u64 {
    reply.body["id"].as_u64().expect("upstream id")
}

#[tokio::test]
async fn authentication_scope_and_role() {
    let api = demo().await;
    let path = format!(
        "{}/groups/my-org/-/virtual_registries/container/registries",
        api.sim.api_url()
    );
    let none = api.send(api.http.get(&path)).await;
    assert_eq!(
        (none.status, none.body.clone()),
        (401, json!({"message": "401 Unauthorized"}))
    );
    let bad = api
        .send(api.http.get(&path).header("PRIVATE-TOKEN", "wrong"))
        .await;
    assert_eq!(
        (bad.status, bad.body),
        (401, json!({"message": "401 Unauthorized"}))
    );
    let bearer = api.send(api.http.get(&path).bearer_auth(TOKEN)).await;
    assert_eq!((bearer.status, bearer.body), (200, json!([])));

    let read_only = start(
        SimConfig {
            read_only_token: true,
            ..config()
        },
        Seed::demo(),
    )
    .await;
    let reply = read_only
        .post(
            "/groups/my-org/-/virtual_registries/container/registries",
            json!({"name": "x"}),
        )
        .await;
    assert_eq!(reply.status, 403);
    assert_eq!(reply.body["error"], json!("insufficient_scope"));
    assert_eq!(reply.body["scope"], json!("api"));
    let developer = start(
        SimConfig {
            role: sim::AccessLevel::Developer,
            ..config()
        },
        Seed::demo(),
    )
    .await;
    let reply = developer
        .post(
            "/groups/my-org/-/virtual_registries/container/registries",
            json!({"name": "x"}),
        )
        .await;
    assert_eq!(
        (reply.status, reply.body),
        (403, json!({"message": "403 Forbidden"}))
    );
    assert_eq!(
        developer
            .get("/groups/100/-/virtual_registries/container/registries")
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn registries_crud_and_validation() {
    let api = demo().await;
    let base = "/groups/my-org/-/virtual_registries/container/registries";
    let created = api
        .post(
            base,
            json!({"name": "docker-cache", "description": "Pull-through"}),
        )
        .await;
    assert_eq!(created.status, 201);
    let id = created.body["id"].as_u64().unwrap();
    assert_eq!(created.body["group_id"], json!(100));
    assert_eq!(created.body["name"], json!("docker-cache"));
    assert_eq!(created.body["description"], json!("Pull-through"));
    assert!(created.body["created_at"].as_str().unwrap().ends_with('Z'));

    let listed = api
        .get("/groups/100/-/virtual_registries/container/registries")
        .await;
    assert_eq!(listed.status, 200);
    assert_eq!(listed.body.as_array().unwrap().len(), 1);
    let details = api.get(&format!("{VR}/registries/{id}")).await;
    assert_eq!(details.status, 200);
    assert_eq!(details.body["registry_upstreams"], json!([]));

    let missing = api.post(base, json!({"description": "x"})).await;
    assert_eq!(
        (missing.status, missing.body),
        (400, json!({"error": "name is missing"}))
    );
    let empty = api.post(base, json!({"name": ""})).await;
    assert_eq!(
        (empty.status, empty.body),
        (400, json!({"error": "name is empty"}))
    );
    let taken = api.post(base, json!({"name": "docker-cache"})).await;
    assert_eq!(
        (taken.status, taken.body),
        (
            400,
            json!({"message": {"name": ["has already been taken"]}})
        )
    );
    let long = api.post(base, json!({"name": "n".repeat(256)})).await;
    assert_eq!(
        long.body,
        json!({"message": {"name": ["is too long (maximum is 255 characters)"]}})
    );
    let long_description = api
        .post(base, json!({"name": "d", "description": "d".repeat(1025)}))
        .await;
    assert_eq!(
        long_description.body,
        json!({"message": {"description": ["is too long (maximum is 1024 characters)"]}})
    );
    for index in 0..4 {
        api.create_registry("my-org", &format!("extra-{index}"))
            .await;
    }
    let sixth = api.post(base, json!({"name": "sixth"})).await;
    assert_eq!(
        (sixth.status, sixth.body),
        (
            400,
            json!({"message": {"base": ["5 registries is the maximum allowed per top-level group."]}})
        )
    );

    let patched = api
        .patch(
            &format!("{VR}/registries/{id}"),
            json!({"description": "changed"}),
        )
        .await;
    assert_eq!(patched.status, 200);
    assert_eq!(
        api.get(&format!("{VR}/registries/{id}")).await.body["description"],
        json!("changed")
    );
    for (field, message) in [
        ("description", "description is empty"),
        ("name", "name is empty"),
    ] {
        let blank = api
            .patch(&format!("{VR}/registries/{id}"), json!({ field: "" }))
            .await;
        assert_eq!(
            (blank.status, blank.body),
            (400, json!({ "error": message }))
        );
    }
    let nothing = api.patch(&format!("{VR}/registries/{id}"), json!({})).await;
    assert_eq!(
        (nothing.status, nothing.body),
        (
            400,
            json!({"error": "name, description are missing, at least one parameter must be provided"})
        )
    );
    let invalid_id = api.get(&format!("{VR}/registries/abc")).await;
    assert_eq!(
        (invalid_id.status, invalid_id.body),
        (400, json!({"error": "id is invalid"}))
    );

    assert_eq!(
        api.delete(&format!("{VR}/registries/{id}")).await.status,
        204
    );
    let gone = api.get(&format!("{VR}/registries/{id}")).await;
    assert_eq!(
        (gone.status, gone.body),
        (404, json!({"message": "404 Not found"}))
    );
}

#[tokio::test]
async fn group_paths_subgroups_and_unknown_groups() {
    let api = demo().await;
    // A subgroup answers 404 on every registry and group upstream route: GitLab's
    // permission check runs before the "only available on top-level groups" one.
    let subgroup = "/groups/my-org%2Fplatform/-/virtual_registries/container";
    for (method, path, body) in [
        (Method::GET, "registries", None),
        (Method::POST, "registries", Some(json!({"name": "r"}))),
        (Method::GET, "upstreams", None),
        (
            Method::POST,
            "upstreams/test",
            Some(json!({"url": "https://registry-1.docker.io"})),
        ),
    ] {
        let reply = api
            .call(method.clone(), &format!("{subgroup}/{path}"), body)
            .await;
        assert_eq!(
            (reply.status, reply.body),
            (404, json!({"message": "404 Not Found"})),
            "{method} {path}"
        );
    }
    let unknown = api
        .get("/groups/nope/-/virtual_registries/container/registries")
        .await;
    assert_eq!(
        (unknown.status, unknown.body),
        (404, json!({"message": "404 Group Not Found"}))
    );
    let raw_slash = api
        .get("/groups/my-org/platform/-/virtual_registries/container/registries")
        .await;
    assert_eq!(raw_slash.status, 404);
    let project = api.get("/projects/my-org%2Fapp").await;
    assert_eq!(project.status, 200);
    assert_eq!(project.body["id"], json!(200));
    assert_eq!(api.get("/projects/my-org/app").await.status, 404);
    let unknown_project = api.get("/projects/999").await;
    assert_eq!(
        unknown_project.body,
        json!({"message": "404 Project Not Found"})
    );
}

#[tokio::test]
async fn upstreams_limits_credentials_and_urls() {
    let api = demo().await;
    let registry = api.create_registry("my-org", "cache").await;
    let created = api
        .post(
            &format!("{VR}/registries/{registry}/upstreams"),
            json!({"name": "Quay", "url": "https://quay.io", "username": "bot", "password": "s3cret",
                   "cache_validity_hours": 48, "description": "quay"}),
        )
        .await;
    assert_eq!(created.status, 201, "{:?}", created.body);
    let quay = upstream_id(&created);
    assert_eq!(created.body["username"], json!("bot"));
    assert_eq!(created.body["cache_validity_hours"], json!(48));
    assert!(created.body.get("password").is_none());
    assert_eq!(
        created.body["registry_upstream"],
        json!({"id": created.body["registry_upstream"]["id"], "registry_id": registry, "position": 1})
    );
    let same = api
        .post(
            &format!("{VR}/registries/{registry}/upstreams"),
            json!({"name": "Quay 2", "url": "https://quay.io", "username": "bot", "password": "s3cret"}),
        )
        .await;
    assert_eq!(
        (same.status, same.body),
        (
            400,
            json!({"message": {"group": ["already has an upstream with the same credentials"]}})
        )
    );
    let half = api
        .post(
            &format!("{VR}/registries/{registry}/upstreams"),
            json!({"name": "x", "url": "https://x.io", "username": "bot"}),
        )
        .await;
    assert_eq!(
        (half.status, half.body),
        (
            400,
            json!({"error": "username, password provide all or none of parameters"})
        )
    );
    let local = api
        .create_upstream(registry, "local", "http://localhost:5000")
        .await;
    assert_eq!(
        (local.status, local.body),
        (
            400,
            json!({"message": {"url": ["is blocked: Requests to localhost are not allowed"]}})
        )
    );
    let missing = api
        .post(&format!("{VR}/registries/{registry}/upstreams"), json!({}))
        .await;
    assert_eq!(
        missing.body,
        json!({"error": "url is missing, name is missing"})
    );
    let negative = api
        .post(
            &format!("{VR}/registries/{registry}/upstreams"),
            json!({"name": "n", "url": "https://n.io", "cache_validity_hours": -1}),
        )
        .await;
    assert_eq!(
        negative.body,
        json!({"message": {"cache_validity_hours": ["must be greater than or equal to 0"]}})
    );
    for index in 2..=5 {
        let reply = api
            .create_upstream(
                registry,
                &format!("u{index}"),
                &format!("https://u{index}.io"),
            )
            .await;
        assert_eq!(reply.body["registry_upstream"]["position"], json!(index));
    }
    let sixth = api.create_upstream(registry, "u6", "https://u6.io").await;
    assert_eq!(
        (sixth.status, sixth.body),
        (
            400,
            json!({"message": {"registry_upstreams.position": ["must be less than or equal to 5"]}})
        )
    );

    // A url change without credentials clears them; the password is never shown.
    let patched = api
        .patch(
            &format!("{VR}/upstreams/{quay}"),
            json!({"url": "https://quay.example.com"}),
        )
        .await;
    assert_eq!(patched.status, 200);
    let fetched = api.get(&format!("{VR}/upstreams/{quay}")).await;
    assert_eq!(fetched.body["url"], json!("https://quay.example.com"));
    assert_eq!(fetched.body["username"], Value::Null);
    assert_eq!(
        fetched.body["registry_upstreams"][0]["registry_id"],
        json!(registry)
    );
    let state = api.control(Method::GET, "/state", None).await;
    let quay_state = state.body["upstreams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|upstream| upstream["id"] == json!(quay))
        .unwrap()
        .clone();
    assert_eq!(quay_state["has_password"], json!(false));
    // Credentials set again, then the state shows only has_password.
    let with_credentials = api
        .patch(
            &format!("{VR}/upstreams/{quay}"),
            json!({"username": "bot", "password": "another-secret"}),
        )
        .await;
    assert_eq!(with_credentials.status, 200);
    let state = api.control(Method::GET, "/state", None).await;
    assert!(!state.body.to_string().contains("another-secret"));
    assert!(state.body.to_string().contains("\"has_password\":true"));
    let nothing = api
        .patch(&format!("{VR}/upstreams/{quay}"), json!({}))
        .await;
    assert_eq!(
        nothing.body,
        json!({"error": "name, description, url, username, password, cache_validity_hours are missing, at least one parameter must be provided"})
    );
    let listed = api
        .get(&format!("{VR}/registries/{registry}/upstreams"))
        .await;
    let positions: Vec<i64> = listed
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|upstream| upstream["registry_upstream"]["position"].as_i64().unwrap())
        .collect();
    assert_eq!(positions, vec![1, 2, 3, 4, 5]);
    assert_eq!(
        api.delete(&format!("{VR}/upstreams/{quay}")).await.status,
        204
    );
    let unknown = api.get(&format!("{VR}/upstreams/{quay}")).await;
    assert_eq!(
        (unknown.status, unknown.body),
        (404, json!({"message": "404 Not found"}))
    );
}

#[tokio::test]
async fn associations_positions_and_cascade() {
    let api = demo().await;
    let first = api.create_registry("my-org", "first").await;
    let second = api.create_registry("my-org", "second").await;
    let mut upstreams = Vec::new();
    for index in 1..=3 {
        let reply = api
            .create_upstream(first, &format!("u{index}"), &format!("https://u{index}.io"))
            .await;
        upstreams.push(upstream_id(&reply));
    }
    // The demo's Docker Hub upstream (400) has no registry yet and is listed.
    let associated = api
        .post(
            &format!("{VR}/registry_upstreams"),
            json!({"registry_id": second, "upstream_id": 400}),
        )
        .await;
    assert_eq!(associated.status, 201);
    assert_eq!(associated.body["position"], json!(1));
    assert_eq!(associated.body["upstream_id"], json!(400));
    let shared = api
        .post(
            &format!("{VR}/registry_upstreams"),
            json!({"registry_id": second, "upstream_id": upstreams[1]}),
        )
        .await;
    assert_eq!(shared.body["position"], json!(2));
    let duplicate = api
        .post(
            &format!("{VR}/registry_upstreams"),
            json!({"registry_id": second, "upstream_id": upstreams[1]}),
        )
        .await;
    assert_eq!(
        (duplicate.status, duplicate.body),
        (
            400,
            json!({"message": {"upstream_id": ["has already been taken"]}})
        )
    );
    api.sim
        .seed(
            &Seed::parse(
                "groups: [{id: 900, full_path: elsewhere}]\nregistries: [{id: 901, group: elsewhere, name: r}]\nupstreams: [{id: 902, group: elsewhere, name: e, url: 'https://e.io', registries: [r]}]\n",
            )
            .unwrap(),
        )
        .unwrap();
    let foreign = api
        .post(
            &format!("{VR}/registry_upstreams"),
            json!({"registry_id": first, "upstream_id": 902}),
        )
        .await;
    assert_eq!(
        (foreign.status, foreign.body),
        (404, json!({"message": "404 Upstream Not Found"}))
    );
    // Move u3 to the front of the first registry.
    let first_list = api.get(&format!("{VR}/registries/{first}")).await.body;
    let u3_association = first_list["registry_upstreams"][2]["id"].as_u64().unwrap();
    let invalid = api
        .patch(
            &format!("{VR}/registry_upstreams/{u3_association}"),
            json!({"position": 21}),
        )
        .await;
    assert_eq!(
        (invalid.status, invalid.body),
        (
            400,
            json!({"error": "position does not have a valid value"})
        )
    );
    let moved = api
        .patch(
            &format!("{VR}/registry_upstreams/{u3_association}"),
            json!({"position": 1}),
        )
        .await;
    assert_eq!(moved.status, 200);
    let order = |body: &Value| -> Vec<(u64, i64)> {
        body["registry_upstreams"]
            .as_array()
            .unwrap()
            .iter()
            .map(|entry| {
                (
                    entry["upstream_id"].as_u64().unwrap(),
                    entry["position"].as_i64().unwrap(),
                )
            })
            .collect()
    };
    let first_list = api.get(&format!("{VR}/registries/{first}")).await.body;
    assert_eq!(
        order(&first_list),
        vec![(upstreams[2], 1), (upstreams[0], 2), (upstreams[1], 3)]
    );
    // 6..=20 passes the parameter check, but GitLab's update_position refuses it and the
    // API ignores that: 200, nothing moves.
    let ignored = api
        .patch(
            &format!("{VR}/registry_upstreams/{u3_association}"),
            json!({"position": 20}),
        )
        .await;
    assert_eq!((ignored.status, ignored.body), (200, json!(200)));
    let first_list = api.get(&format!("{VR}/registries/{first}")).await.body;
    assert_eq!(
        order(&first_list),
        vec![(upstreams[2], 1), (upstreams[0], 2), (upstreams[1], 3)]
    );
    let capped = api
        .patch(
            &format!("{VR}/registry_upstreams/{u3_association}"),
            json!({"position": 5}),
        )
        .await;
    assert_eq!(capped.status, 200);
    let first_list = api.get(&format!("{VR}/registries/{first}")).await.body;
    assert_eq!(
        order(&first_list),
        vec![(upstreams[0], 1), (upstreams[1], 2), (upstreams[2], 3)]
    );
    // Disassociating renumbers; the upstream survives without a registry.
    let u1_association = first_list["registry_upstreams"][0]["id"].as_u64().unwrap();
    assert_eq!(
        api.delete(&format!("{VR}/registry_upstreams/{u1_association}"))
            .await
            .status,
        204
    );
    let first_list = api.get(&format!("{VR}/registries/{first}")).await.body;
    assert_eq!(
        order(&first_list),
        vec![(upstreams[1], 1), (upstreams[2], 2)]
    );
    assert_eq!(
        api.get(&format!("{VR}/upstreams/{}", upstreams[0]))
            .await
            .status,
        200
    );
    // Deleting the first registry deletes u3 (exclusive), keeps u2 (shared) and u1.
    assert_eq!(
        api.delete(&format!("{VR}/registries/{first}")).await.status,
        204
    );
    assert_eq!(
        api.get(&format!("{VR}/upstreams/{}", upstreams[2]))
            .await
            .status,
        404
    );
    assert_eq!(
        api.get(&format!("{VR}/upstreams/{}", upstreams[1]))
            .await
            .status,
        200
    );
    assert_eq!(
        api.get(&format!("{VR}/upstreams/{}", upstreams[0]))
            .await
            .status,
        200
    );
    let second_list = api.get(&format!("{VR}/registries/{second}")).await.body;
    assert_eq!(order(&second_list), vec![(400, 1), (upstreams[1], 2)]);
    // Deleting an upstream renumbers every registry it was in.
    assert_eq!(api.delete(&format!("{VR}/upstreams/400")).await.status, 204);
    let second_list = api.get(&format!("{VR}/registries/{second}")).await.body;
    assert_eq!(order(&second_list), vec![(upstreams[1], 1)]);
    // A sixth association is refused.
    for index in 0..4 {
        let reply = api
            .create_upstream(
                second,
                &format!("fill{index}"),
                &format!("https://fill{index}.io"),
            )
            .await;
        assert_eq!(reply.status, 201);
    }
    let sixth = api
        .post(
            &format!("{VR}/registry_upstreams"),
            json!({"registry_id": second, "upstream_id": upstreams[0]}),
        )
        .await;
    assert_eq!(
        (sixth.status, sixth.body),
        (
            400,
            json!({"message": {"position": ["must be less than or equal to 5"]}})
        )
    );
}

#[tokio::test]
async fn group_upstream_list_paginates_over_more_than_100() {
    let api = demo().await;
    let mut yaml = String::from("upstreams:\n");
    for index in 0..130 {
        yaml.push_str(&format!(
            "  - {{group: my-org, name: 'mirror-{index:03}', url: 'https://m{index}.example.com'}}\n"
        ));
    }
    let seeded = api
        .send(
            api.http
                .post(format!("{}/-/sim/seed", api.sim.base_url()))
                .body(yaml),
        )
        .await;
    assert_eq!(seeded.status, 201, "{:?}", seeded.body);
    let base = "/groups/my-org/-/virtual_registries/container/upstreams";
    let first = api.get(base).await;
    assert_eq!(first.body.as_array().unwrap().len(), 20);
    assert_eq!(first.header("x-total"), "131");
    assert_eq!(first.header("x-total-pages"), "7");
    assert_eq!(first.header("x-page"), "1");
    assert_eq!(first.header("x-per-page"), "20");
    assert_eq!(first.header("x-next-page"), "2");
    assert_eq!(first.header("x-prev-page"), "");
    let capped = api.get(&format!("{base}?per_page=500")).await;
    assert_eq!(capped.body.as_array().unwrap().len(), 100);
    assert_eq!(capped.header("x-per-page"), "100");
    let last = api.get(&format!("{base}?per_page=100&page=2")).await;
    assert_eq!(last.body.as_array().unwrap().len(), 31);
    assert_eq!(last.header("x-next-page"), "");
    assert_eq!(last.header("x-prev-page"), "1");
    let link = last.header("link");
    assert!(link.contains("rel=\"prev\""), "{link}");
    assert!(link.contains("rel=\"first\""), "{link}");
    assert!(!link.contains("rel=\"next\""), "{link}");
    let mut seen = Vec::new();
    let mut url = format!("{}{base}?per_page=50", api.sim.api_url());
    loop {
        let reply = api
            .send(api.http.get(&url).header("PRIVATE-TOKEN", TOKEN))
            .await;
        seen.extend(
            reply
                .body
                .as_array()
                .unwrap()
                .iter()
                .map(|upstream| upstream["id"].clone()),
        );
        let link = reply.header("link");
        let Some(next) = link
            .split(", ")
            .find(|part| part.ends_with("rel=\"next\""))
            .map(|part| {
                part.trim_start_matches('<')
                    .split('>')
                    .next()
                    .unwrap()
                    .to_owned()
            })
        else {
            break;
        };
        url = next;
    }
    assert_eq!(seen.len(), 131);
    let filtered = api.get(&format!("{base}?upstream_name=MIRROR-12")).await;
    assert_eq!(filtered.header("x-total"), "10");
    let docker = api.get(&format!("{base}?upstream_name=docker")).await;
    assert_eq!(docker.body[0]["name"], json!("Docker Hub"));
}

#[tokio::test]
async fn cache_entries_list_search_delete_and_purge() {
    let api = demo().await;
    let base = format!("{VR}/upstreams/400/cache_entries");
    let all = api.get(&base).await;
    assert_eq!(all.status, 200);
    assert_eq!(all.header("x-total"), "5");
    let entry = &all.body[0];
    for field in [
        "id",
        "group_id",
        "upstream_id",
        "upstream_checked_at",
        "file_sha1",
        "size",
        "relative_path",
        "content_type",
        "upstream_etag",
        "created_at",
        "updated_at",
        "downloads_count",
        "downloaded_at",
    ] {
        assert!(entry.get(field).is_some(), "{field} missing in {entry}");
    }
    assert_eq!(
        entry.get("file_md5"),
        None,
        "GitLab's entity has no file_md5"
    );
    let searched = api
        .get(&format!("{base}?search=library/alpine/manifests"))
        .await;
    assert_eq!(searched.body.as_array().unwrap().len(), 2);
    let paged = api.get(&format!("{base}?per_page=2&page=3")).await;
    assert_eq!(paged.body.as_array().unwrap().len(), 1);
    let id = searched.body[0]["id"].as_str().unwrap().to_owned();
    assert_eq!(
        api.delete(&format!("{VR}/cache_entries/{id}")).await.status,
        204
    );
    let again = api.delete(&format!("{VR}/cache_entries/{id}")).await;
    assert_eq!(
        (again.status, again.body),
        (404, json!({"message": "404 Not found"}))
    );
    assert_eq!(
        api.delete(&format!("{VR}/upstreams/400/cache"))
            .await
            .status,
        204
    );
    assert_eq!(api.get(&base).await.header("x-total"), "0");
    let registry = api.create_registry("my-org", "r").await;
    assert_eq!(
        api.delete(&format!("{VR}/registries/{registry}/cache"))
            .await
            .status,
        204
    );
}

#[tokio::test]
async fn connection_tests_send_head_and_map_answers() {
    let api = start(
        SimConfig {
            allow_local_network: true,
            upstream_timeout: Duration::from_millis(500),
            ..config()
        },
        Seed::demo(),
    )
    .await;
    let stub = UpstreamStub::start(StubBehaviour::default()).await.unwrap();
    let test = "/groups/my-org/-/virtual_registries/container/upstreams/test";
    let reply = api.post(test, json!({"url": stub.url()})).await;
    assert_eq!((reply.status, reply.body), (200, json!({"success": true})));
    let request = stub.requests().pop().unwrap();
    assert_eq!(request.method, "HEAD");
    assert_eq!(request.path, "/v2/library/alpine/manifests/latest");
    // A url ending in /v2 (or /v2/) is probed below it once.
    let with_v2 = api
        .post(test, json!({"url": format!("{}/v2/", stub.url())}))
        .await;
    assert_eq!(with_v2.body, json!({"success": true}));
    assert_eq!(
        stub.requests().pop().unwrap().path,
        "/v2/library/alpine/manifests/latest"
    );
    for (status, expected) in [
        (404, json!({"success": true})),
        (
            403,
            json!({"success": false, "result": "Error: 403 - Forbidden"}),
        ),
        (
            503,
            json!({"success": false, "result": "Error: 503 - Service Unavailable"}),
        ),
        (
            500,
            json!({"success": false, "result": "Error: 500 - Internal Server Error"}),
        ),
        (
            429,
            json!({"success": false, "result": "Error: 429 - Too Many Requests"}),
        ),
    ] {
        stub.set_status(status);
        assert_eq!(
            api.post(test, json!({"url": stub.url()})).await.body,
            expected
        );
    }
    stub.set_behaviour(StubBehaviour::requiring("bot", "pw"));
    let anonymous = api.post(test, json!({"url": stub.url()})).await;
    assert_eq!(
        anonymous.body,
        json!({"success": false, "result": "Error: 401 - Unauthorized"})
    );
    let authenticated = api
        .post(
            test,
            json!({"url": stub.url(), "username": "bot", "password": "pw"}),
        )
        .await;
    assert_eq!(authenticated.body, json!({"success": true}));
    // The credentials went to the token realm only; the registry saw a Bearer token.
    let flow: Vec<(String, String, Option<String>, bool)> = stub.requests()
        [stub.requests().len() - 3..]
        .iter()
        .map(|r| {
            (
                r.method.clone(),
                r.path.clone(),
                r.username.clone(),
                r.bearer,
            )
        })
        .collect();
    let probe = "/v2/library/alpine/manifests/latest".to_owned();
    assert_eq!(
        flow,
        vec![
            ("HEAD".into(), probe.clone(), None, false),
            ("GET".into(), "/token".into(), Some("bot".into()), false),
            ("HEAD".into(), probe, None, true),
        ]
    );
    let token_query = stub.requests()[stub.requests().len() - 2]
        .query
        .clone()
        .unwrap();
    assert!(
        token_query.contains("service=upstream-stub"),
        "{token_query}"
    );
    assert!(
        token_query.contains("scope=repository%3Alibrary%2Falpine%3Apull"),
        "{token_query}"
    );
    assert!(
        stub.registry_requests()
            .iter()
            .all(|r| r.username.is_none()),
        "no Basic credentials to the registry itself"
    );
    let half = api
        .post(test, json!({"url": stub.url(), "username": "bot"}))
        .await;
    assert_eq!(
        (half.status, half.body),
        (
            400,
            json!({"error": "username, password provide all or none of parameters"})
        )
    );

    // An existing upstream, tested with its stored credentials and with overrides.
    let registry = api.create_registry("my-org", "r").await;
    let created = api
        .post(
            &format!("{VR}/registries/{registry}/upstreams"),
            json!({"name": "stub", "url": stub.url(), "username": "bot", "password": "pw"}),
        )
        .await;
    let id = upstream_id(&created);
    let stored = api
        .post(&format!("{VR}/upstreams/{id}/test"), json!({}))
        .await;
    assert_eq!(stored.body, json!({"success": true}));
    let wrong = api
        .post(
            &format!("{VR}/upstreams/{id}/test"),
            json!({"username": "bot", "password": "nope"}),
        )
        .await;
    assert_eq!(
        wrong.body,
        json!({"success": false, "result": "Error: 401 - Unauthorized"})
    );

    stub.set_behaviour(StubBehaviour {
        delay: Duration::from_secs(3),
        ..StubBehaviour::default()
    });
    let slow = api.post(test, json!({"url": stub.url()})).await;
    assert_eq!(
        slow.body,
        json!({"success": false, "result": "Error: Connection timeout"})
    );

    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let refused = api
        .post(test, json!({"url": format!("http://{closed}")}))
        .await;
    assert_eq!(refused.body["success"], json!(false));
    assert!(
        refused.body["result"]
            .as_str()
            .unwrap()
            .starts_with("Error: ")
    );

    let strict = demo().await;
    let blocked = strict.post(test, json!({"url": stub.url()})).await;
    assert_eq!(
        (blocked.status, blocked.body),
        (
            400,
            json!({"message": {"url": ["is blocked: Requests to localhost are not allowed"]}})
        )
    );
}

#[tokio::test]
async fn stubbed_connection_tests_use_no_network() {
    let api = start(
        SimConfig {
            stub_upstreams: true,
            ..config()
        },
        Seed::demo(),
    )
    .await;
    let test = "/groups/my-org/-/virtual_registries/container/upstreams/test";
    let ok = api.post(test, json!({"url": "https://quay.io"})).await;
    assert_eq!(ok.body, json!({"success": true}));
    // The demo's Docker Hub upstream holds this url without credentials: the unsaved test
    // upstream fails the model's uniqueness rule before any test.
    let duplicate = api
        .post(test, json!({"url": "https://registry-1.docker.io"}))
        .await;
    assert_eq!(duplicate.status, 400);
    let unavailable = api
        .post(test, json!({"url": "https://unavailable.example.com"}))
        .await;
    assert_eq!(
        unavailable.body,
        json!({"success": false, "result": "Error: 503 - Service Unavailable"})
    );
    let denied = api
        .post(test, json!({"url": "https://unauthorized.example.com"}))
        .await;
    assert_eq!(
        denied.body,
        json!({"success": false, "result": "Error: 401 - Unauthorized"})
    );
    let existing = api
        .post(&format!("{VR}/upstreams/400/test"), json!({}))
        .await;
    assert_eq!(existing.body, json!({"success": true}));
}

#[tokio::test]
async fn container_repositories_and_tags() {
    let api = demo().await;
    let repositories = api
        .get("/projects/my-org%2Fapp/registry/repositories?tags=true&tags_count=true")
        .await;
    assert_eq!(repositories.status, 200);
    let root = &repositories.body[0];
    assert_eq!(root["id"], json!(300));
    assert_eq!(root["path"], json!("my-org/app"));
    assert_eq!(
        root["location"],
        json!("registry.gitlab.example.com/my-org/app")
    );
    assert_eq!(root["tags_count"], json!(14));
    assert_eq!(root["tags"].as_array().unwrap().len(), 14);
    assert_eq!(repositories.body[1]["path"], json!("my-org/app/worker"));
    let group = api.get("/groups/my-org/registry/repositories").await;
    assert_eq!(group.header("x-total"), "5");
    assert!(
        group
            .body
            .as_array()
            .unwrap()
            .iter()
            .all(|repository| repository.get("tags").is_none())
    );
    let details = api
        .get("/registry/repositories/302?tags_count=true&size=true")
        .await;
    assert_eq!(details.body["tags_count"], json!(8));
    assert!(details.body["size"].as_u64().unwrap() > 0);
    assert_eq!(api.get("/registry/repositories/999").await.status, 404);

    let tag = api
        .get("/projects/200/registry/repositories/300/tags/1.4.0")
        .await;
    assert_eq!(tag.status, 200);
    for field in [
        "name",
        "path",
        "location",
        "revision",
        "short_revision",
        "digest",
        "created_at",
        "total_size",
    ] {
        assert!(tag.body.get(field).is_some(), "{field}");
    }
    assert_eq!(tag.body["path"], json!("my-org/app:1.4.0"));
    let unknown = api
        .get("/projects/200/registry/repositories/300/tags/nope")
        .await;
    assert_eq!(
        (unknown.status, unknown.body),
        (404, json!({"message": "404 Tag Not Found"}))
    );
    let wrong_project = api
        .get("/projects/201/registry/repositories/300/tags")
        .await;
    assert_eq!(wrong_project.status, 404);

    let deleted = api
        .delete("/projects/200/registry/repositories/300/tags/1.3.0")
        .await;
    assert_eq!(deleted.status, 200);
    assert_eq!(
        api.get("/projects/200/registry/repositories/300/tags/1.3.0")
            .await
            .status,
        404
    );
    let protected = api
        .delete("/projects/200/registry/repositories/300/tags/1.2.0")
        .await;
    assert_eq!(
        (protected.status, protected.body),
        (403, json!({"message": "403 Forbidden"}))
    );
    let rules = api
        .get("/projects/my-org%2Fapp/registry/protection/tag/rules")
        .await;
    assert_eq!(rules.status, 200);
    assert_eq!(rules.body[0]["tag_name_pattern"], json!(r"^1\.2\.\d+$"));
    assert_eq!(
        rules.body[0]["minimum_access_level_for_delete"],
        json!("owner")
    );
    assert_eq!(
        api.delete("/projects/200/registry/repositories/301")
            .await
            .status,
        202
    );
    assert_eq!(api.get("/registry/repositories/301").await.status, 404);
}

#[tokio::test]
async fn encoded_tag_names_in_paths() {
    let api = demo().await;
    let put = api
        .control(
            Method::PUT,
            "/repositories/300/tags/feature%2Bx",
            Some(json!({"digest": "sha256:abc", "total_size": 5})),
        )
        .await;
    assert_eq!(put.status, 200, "{:?}", put.body);
    let tag = api
        .get("/projects/200/registry/repositories/300/tags/feature%2Bx")
        .await;
    assert_eq!(tag.body["name"], json!("feature+x"));
}

#[tokio::test]
async fn tag_lists_paginate_by_offset_and_keyset() {
    let mut yaml = String::from(
        "groups: [{id: 1, full_path: g}]\nprojects:\n  - id: 2\n    path_with_namespace: g/p\n    repositories:\n      - id: 3\n        tags:\n",
    );
    for index in 0..150 {
        yaml.push_str(&format!(
            "          - {{name: 't{index:03}', digest: 'sha256:{index:064}'}}\n"
        ));
    }
    let api = start(config(), Seed::parse(&yaml).unwrap()).await;
    let base = "/projects/g%2Fp/registry/repositories/3/tags";
    let offset = api.get(&format!("{base}?per_page=100&page=2")).await;
    assert_eq!(offset.body.as_array().unwrap().len(), 50);
    assert_eq!(offset.header("x-total"), "150");
    assert_eq!(offset.body[0]["name"], json!("t100"));
    assert_eq!(offset.body[0].get("digest"), None);

    let mut names = Vec::new();
    let mut url = format!(
        "{}{base}?pagination=keyset&per_page=40&sort=asc",
        api.sim.api_url()
    );
    let mut pages = 0;
    loop {
        let reply = api
            .send(api.http.get(&url).header("PRIVATE-TOKEN", TOKEN))
            .await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.header("x-total"), "<none>");
        pages += 1;
        names.extend(
            reply
                .body
                .as_array()
                .unwrap()
                .iter()
                .map(|tag| tag["name"].as_str().unwrap().to_owned()),
        );
        let link = reply.header("link");
        if link == "<none>" {
            break;
        }
        assert!(link.ends_with("; rel=\"next\""), "{link}");
        url = link
            .trim_start_matches('<')
            .split('>')
            .next()
            .unwrap()
            .to_owned();
    }
    assert_eq!(pages, 4);
    assert_eq!(names.len(), 150);
    assert!(names.windows(2).all(|pair| pair[0] < pair[1]));
    let descending = api
        .get(&format!(
            "{base}?pagination=keyset&per_page=2&sort=desc&last=t100"
        ))
        .await;
    assert_eq!(
        descending.body,
        json!([
            {"name": "t099", "path": "g/p:t099", "location": "registry.gitlab.example.com/g/p:t099"},
            {"name": "t098", "path": "g/p:t098", "location": "registry.gitlab.example.com/g/p:t098"}
        ])
    );
    assert!(descending.header("link").contains("last=t098"));
    let invalid = api
        .get(&format!("{base}?pagination=keyset&sort=sideways"))
        .await;
    assert_eq!(
        (invalid.status, invalid.body),
        (400, json!({"error": "sort does not have a valid value"}))
    );

    let detailed = start(
        SimConfig {
            tag_list_details: true,
            ..config()
        },
        Seed::parse(&yaml).unwrap(),
    )
    .await;
    let list = detailed.get(&format!("{base}?per_page=1")).await;
    assert_eq!(list.body[0]["digest"], json!(format!("sha256:{:064}", 0)));
}

#[tokio::test]
async fn bulk_delete_rules() {
    let api = demo().await;
    api.sim.set_clock(Some(jiff::Timestamp::now()));
    let path = "/projects/my-org%2Fapp/registry/repositories/300/tags";
    let missing = api.delete(path).await;
    assert_eq!(
        (missing.status, missing.body),
        (
            400,
            json!({"error": "name_regex, name_regex_delete are missing, at least one parameter must be provided"})
        )
    );
    let invalid = api
        .call(
            Method::DELETE,
            path,
            Some(json!({"name_regex_delete": "(unclosed"})),
        )
        .await;
    assert_eq!(invalid.status, 400);
    assert!(
        invalid.body["error"]
            .as_str()
            .unwrap()
            .starts_with("name_regex_delete is an invalid regexp: "),
        "{}",
        invalid.body
    );
    // Form-encoded, as the documented curl examples send it.
    let accepted = api
        .send(
            api.request(Method::DELETE, path)
                .header("Content-Type", "application/x-www-form-urlencoded")
                .body(
                    "name_regex_delete=.*&name_regex_keep=stable-.*%7Cmain&keep_n=2&older_than=14d",
                ),
        )
        .await;
    assert_eq!((accepted.status, accepted.body), (202, json!(202)));
    let remaining: Vec<String> = api.sim.snapshot().repositories[0]
        .tags
        .keys()
        .cloned()
        .collect();
    // latest, and main / stable-1 (keep regex) stay; keep_n spares the two newest matches
    // (main's sha, 1.4.0); protected 1.2.x stay; the tag without a manifest has no creation
    // time and is spared by older_than; the other tags are older than 14 days and go.
    for kept in [
        "latest",
        "main",
        "stable-1",
        "1.4.0",
        "1.2.0",
        "1.2.1",
        "broken-push",
    ] {
        assert!(
            remaining.contains(&kept.to_owned()),
            "{kept} missing from {remaining:?}"
        );
    }
    for gone in ["1.3.2", "1.3.1", "1.3.0"] {
        assert!(
            !remaining.contains(&gone.to_owned()),
            "{gone} still in {remaining:?}"
        );
    }
    let again = api
        .call(
            Method::DELETE,
            path,
            Some(json!({"name_regex_delete": ".*"})),
        )
        .await;
    assert_eq!(
        (again.status, again.body),
        (
            400,
            json!({"message": "This request has already been made. You can run this at most once an hour for a given container repository"})
        )
    );
    let clock = api
        .control(
            Method::POST,
            "/clock",
            Some(json!({"advance_seconds": 3601})),
        )
        .await;
    assert_eq!(clock.body["frozen"], json!(true));
    let later = api
        .call(
            Method::DELETE,
            path,
            Some(json!({"name_regex": "nothing-matches"})),
        )
        .await;
    assert_eq!(later.status, 202);
}

#[tokio::test]
async fn project_cleanup_policy() {
    let api = demo().await;
    api.sim
        .set_clock(Some("2025-03-01T00:00:00Z".parse().unwrap()));
    let before = api.get("/projects/200").await;
    assert_eq!(
        before.body["container_expiration_policy"]["cadence"],
        json!("1d")
    );
    let updated = api
        .call(
            Method::PUT,
            "/projects/my-org%2Fapp",
            Some(json!({"container_expiration_policy_attributes": {
                "cadence": "1month", "enabled": true, "keep_n": 10, "older_than": "14d",
                "name_regex": "", "name_regex_delete": ".*", "name_regex_keep": "main|stable-.*"}})),
        )
        .await;
    assert_eq!(updated.status, 200, "{:?}", updated.body);
    let policy = &updated.body["container_expiration_policy"];
    assert_eq!(policy["cadence"], json!("1month"));
    assert_eq!(policy["name_regex"], json!(".*"));
    assert_eq!(policy["keep_n"], json!(10));
    // One cadence ahead, a month counted as 30 days (INFERRED).
    assert_eq!(policy["next_run_at"], json!("2025-03-31T00:00:00.000Z"));
    assert_eq!(
        policy.get("name_regex_delete"),
        None,
        "no name_regex_delete in GitLab's answer"
    );
    let fetched = api.get("/projects/200").await;
    assert_eq!(fetched.body["container_expiration_policy"], *policy);
    let bad = api
        .call(
            Method::PUT,
            "/projects/200",
            Some(json!({"container_expiration_policy_attributes": {"cadence": "2d"}})),
        )
        .await;
    assert_eq!(
        (bad.status, bad.body),
        (
            400,
            json!({"message": {"container_expiration_policy.cadence": ["is not included in the list"]}})
        )
    );
    let bad_keep = api
        .call(
            Method::PUT,
            "/projects/200",
            Some(json!({"container_expiration_policy_attributes": {"keep_n": 7, "older_than": "1d"}})),
        )
        .await;
    assert_eq!(
        bad_keep.body,
        json!({"message": {
            "container_expiration_policy.keep_n": ["is not included in the list"],
            "container_expiration_policy.older_than": ["is not included in the list"]}})
    );
}

#[tokio::test]
async fn request_counts_and_reset() {
    let api = demo().await;
    for _ in 0..3 {
        api.get("/groups/my-org/-/virtual_registries/container/registries")
            .await;
    }
    api.get(&format!("{VR}/registries/77")).await;
    let counts = api.control(Method::GET, "/requests", None).await;
    assert_eq!(
        counts.body,
        json!({
            "GET /groups/:id/-/virtual_registries/container/registries": 3,
            "GET /virtual_registries/container/registries/:id": 1
        })
    );
    assert_eq!(
        api.sim.request_count(
            "GET",
            "/groups/:id/-/virtual_registries/container/registries"
        ),
        3
    );
    assert_eq!(api.sim.write_count(), 0);
    assert_eq!(
        api.control(Method::DELETE, "/requests", None).await.status,
        204
    );
    assert!(api.sim.request_counts().is_empty());
}

#[tokio::test]
async fn injected_faults() {
    let api = demo().await;
    let list = "/groups/my-org/-/virtual_registries/container/registries";
    let set = api
        .control(
            Method::POST,
            "/faults",
            Some(json!({"once": [
                {"count": 2, "method": "GET", "route": "/groups/:id/-/virtual_registries/container/registries",
                 "fault": {"kind": "status", "status": 503}},
                {"route": "/projects/:id", "fault": {"kind": "rate_limited", "retry_after_seconds": 7}}
            ]})),
        )
        .await;
    assert_eq!(set.status, 200);
    for _ in 0..2 {
        let failed = api.get(list).await;
        assert_eq!(
            (failed.status, failed.body),
            (503, json!({"message": "503 Service Unavailable"}))
        );
    }
    assert_eq!(api.get(list).await.status, 200);
    let limited = api.get("/projects/200").await;
    assert_eq!(limited.status, 429);
    assert_eq!(limited.header("retry-after"), "7");
    assert_eq!(limited.body, json!("Retry later\n"));
    assert_eq!(api.get("/projects/200").await.status, 200);
    api.control(
        Method::POST,
        "/faults",
        Some(json!({"once": [{"method": "DELETE", "fault": {"kind": "endpoint_rate_limited"}}]})),
    )
    .await;
    let endpoint_limited = api
        .delete("/projects/200/registry/repositories/300/tags/main")
        .await;
    assert_eq!(endpoint_limited.status, 429);
    assert_eq!(endpoint_limited.header("retry-after"), "60");
    assert_eq!(
        endpoint_limited.body,
        json!({"message": {"error": "This endpoint has been requested too many times. Try again later."}})
    );

    api.sim.inject_fault(FaultSpec {
        once: vec![sim::OneShotFault {
            count: 1,
            method: None,
            route: None,
            fault: sim::FaultAction::Drop,
        }],
        ..FaultSpec::default()
    });
    let dropped = api.request(Method::GET, list).send().await;
    let dropped_fully = match dropped {
        Err(_) => true,
        Ok(response) => response.bytes().await.is_err(),
    };
    assert!(
        dropped_fully,
        "a dropped connection must not yield a complete answer"
    );
    assert_eq!(api.get(list).await.status, 200);

    let client = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    api.control(
        Method::POST,
        "/faults",
        Some(json!({"once": [{"fault": {"kind": "delay", "delay_ms": 3000}}]})),
    )
    .await;
    let timed_out = client
        .get(format!("{}{list}", api.sim.api_url()))
        .header("PRIVATE-TOKEN", TOKEN)
        .send()
        .await;
    assert!(timed_out.is_err_and(|error| error.is_timeout()));

    api.control(
        Method::POST,
        "/faults",
        Some(json!({"error_rate": 1.0, "error_status": 500})),
    )
    .await;
    assert_eq!(api.get(list).await.status, 500);
    // Control endpoints are never faulted.
    assert_eq!(
        api.control(Method::GET, "/faults", None).await.body["error_rate"],
        json!(1.0)
    );
    assert_eq!(
        api.control(Method::DELETE, "/faults", None).await.status,
        204
    );
    assert_eq!(api.get(list).await.status, 200);
    let invalid = api
        .control(Method::POST, "/faults", Some(json!({"bogus": 1})))
        .await;
    assert_eq!(invalid.status, 400);
}

#[tokio::test]
async fn control_state_seed_and_clock() {
    let api = demo().await;
    let state = api.control(Method::GET, "/state", None).await;
    assert_eq!(state.status, 200);
    assert_eq!(state.body["groups"].as_array().unwrap().len(), 2);
    let bad_seed = api
        .send(
            api.http
                .post(format!("{}/-/sim/seed", api.sim.base_url()))
                .body("{\"projects\": [{\"id\": 1, \"path_with_namespace\": \"ghost/p\"}]}"),
        )
        .await;
    assert_eq!(bad_seed.status, 400);
    assert_eq!(bad_seed.body["reason"], json!("SeedReferenceUnknown"));
    let clock = api
        .control(
            Method::POST,
            "/clock",
            Some(json!({"now": "2030-01-01T00:00:00Z"})),
        )
        .await;
    assert_eq!(
        clock.body,
        json!({"now": "2030-01-01T00:00:00.000Z", "frozen": true})
    );
    let created = api
        .post(
            "/groups/my-org/-/virtual_registries/container/registries",
            json!({"name": "timed"}),
        )
        .await;
    assert_eq!(
        created.body["created_at"],
        json!("2030-01-01T00:00:00.000Z")
    );
    let released = api
        .control(Method::POST, "/clock", Some(json!({"now": null})))
        .await;
    assert_eq!(released.body["frozen"], json!(false));
}

#[tokio::test]
async fn concurrent_creates_respect_limits() {
    let api = demo().await;
    let registry = api.create_registry("my-org", "busy").await;
    let api = std::sync::Arc::new(api);
    let mut tasks = Vec::new();
    for index in 0..40 {
        let api = api.clone();
        tasks.push(tokio::spawn(async move {
            api.create_upstream(
                registry,
                &format!("c{index}"),
                &format!("https://c{index}.io"),
            )
            .await
            .status
        }));
    }
    let mut statuses = Vec::new();
    for task in tasks {
        statuses.push(task.await.unwrap());
    }
    assert_eq!(statuses.iter().filter(|status| **status == 201).count(), 5);
    assert_eq!(statuses.iter().filter(|status| **status == 400).count(), 35);
    let listed = api
        .get(&format!("{VR}/registries/{registry}/upstreams"))
        .await;
    let positions: Vec<i64> = listed
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|upstream| upstream["registry_upstream"]["position"].as_i64().unwrap())
        .collect();
    assert_eq!(positions, vec![1, 2, 3, 4, 5]);
    assert_eq!(
        api.sim.request_count(
            "POST",
            "/virtual_registries/container/registries/:id/upstreams"
        ),
        40
    );
}

#[tokio::test]
async fn serve_answers_until_shutdown() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(sim::serve(config(), Seed::demo(), listener, async move {
        let _ = stopped.await;
    }));
    let reply = reqwest::Client::new()
        .get(format!("http://{address}/api/v4/projects/my-org%2Fapi"))
        .header("PRIVATE-TOKEN", TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 200);
    stop.send(()).unwrap();
    let finished = tokio::time::timeout(Duration::from_secs(30), server)
        .await
        .expect("server stops")
        .unwrap();
    assert!(finished.is_ok());
}

#[tokio::test]
async fn project_branches_are_seeded_listed_by_page_and_deleted_by_encoded_name() {
    let yaml = "groups: [{id: 1, full_path: g}]\nprojects:\n  - id: 2\n    path_with_namespace: g/p\n    branches: [main, feature/Login-Form]\n";
    let api = start(config(), Seed::parse(yaml).unwrap()).await;
    let base = "/projects/g%2Fp/repository/branches";
    let first = api.get(&format!("{base}?per_page=1")).await;
    assert_eq!(first.status, 200);
    assert_eq!(first.header("x-total"), "2");
    assert_eq!(first.header("x-next-page"), "2");
    // Sorted by name, as GitLab lists branches.
    assert_eq!(first.body[0]["name"], json!("feature/Login-Form"));
    assert_eq!(first.body[0]["merged"], json!(false));
    assert_eq!(
        api.delete(&format!("{base}/feature%2FLogin-Form"))
            .await
            .status,
        204
    );
    let deleted_again = api.delete(&format!("{base}/feature%2FLogin-Form")).await;
    assert_eq!(deleted_again.status, 404);
    assert_eq!(deleted_again.body["message"], json!("404 Branch Not Found"));
    let rest = api.get(base).await;
    assert_eq!(rest.body.as_array().map(Vec::len), Some(1));
    assert_eq!(rest.body[0]["name"], json!("main"));
    assert_eq!(
        api.get("/projects/g%2Fq/repository/branches").await.status,
        404
    );
    // An unknown seed key is refused, so `branches` is the one spelling.
    assert!(Seed::parse("projects: [{id: 3, path_with_namespace: g/x, branch: [main]}]").is_err());
}

/// A simulator that may reach loopback upstreams, with a registry in `my-org`.
async fn local_with_registry() -> (Api, u64) {
    let api = start(
        SimConfig {
            allow_local_network: true,
            ..config()
        },
        Seed::demo(),
    )
    .await;
    let registry = api.create_registry("my-org", "r").await;
    (api, registry)
}

fn state_upstream(api: &Api, id: u64) -> sim::state::Upstream {
    api.sim
        .snapshot()
        .upstreams
        .into_iter()
        .find(|upstream| upstream.id == id)
        .expect("upstream in state")
}

#[tokio::test]
async fn url_change_clears_credentials_unless_both_change_in_the_same_request() {
    let (api, registry) = local_with_registry().await;
    let created = api
        .post(
            &format!("{VR}/registries/{registry}/upstreams"),
            json!({"name": "q", "url": "https://quay.io", "username": "bot", "password": "pw"}),
        )
        .await;
    let id = upstream_id(&created);
    let path = format!("{VR}/upstreams/{id}");
    let credentials = |api: &Api| {
        let upstream = state_upstream(api, id);
        (upstream.username, upstream.password.is_some())
    };
    // The same credentials re-sent with a new url are no change: cleared.
    let resent = api
        .patch(
            &path,
            json!({"url": "https://quay.example.com", "username": "bot", "password": "pw"}),
        )
        .await;
    assert_eq!(resent.status, 200);
    assert_eq!(credentials(&api), (None, false));
    // Sent in a later request, they stay.
    let later = api
        .patch(&path, json!({"username": "bot", "password": "pw"}))
        .await;
    assert_eq!(later.status, 200);
    assert_eq!(credentials(&api), (Some("bot".into()), true));
    // Only the password changes with the url: both cleared.
    api.patch(
        &path,
        json!({"url": "https://quay2.example.com", "username": "bot", "password": "new"}),
    )
    .await;
    assert_eq!(credentials(&api), (None, false));
    api.patch(&path, json!({"username": "bot", "password": "pw"}))
        .await;
    // Both change with the url: kept.
    api.patch(
        &path,
        json!({"url": "https://quay3.example.com", "username": "robot", "password": "new"}),
    )
    .await;
    assert_eq!(credentials(&api), (Some("robot".into()), true));
    // Other fields leave them alone.
    api.patch(&path, json!({"cache_validity_hours": 1})).await;
    assert_eq!(credentials(&api), (Some("robot".into()), true));
}

#[tokio::test]
async fn patch_upstream_has_no_all_or_none_but_the_model_presence_rules() {
    let (api, registry) = local_with_registry().await;
    let created = api
        .post(
            &format!("{VR}/registries/{registry}/upstreams"),
            json!({"name": "q", "url": "https://quay.io", "username": "bot", "password": "pw"}),
        )
        .await;
    let id = upstream_id(&created);
    let path = format!("{VR}/upstreams/{id}");
    let alone = api.patch(&path, json!({"username": "robot"})).await;
    assert_eq!((alone.status, alone.body), (200, json!(200)));
    assert_eq!(state_upstream(&api, id).username.as_deref(), Some("robot"));
    let blank_username = api
        .patch(&path, json!({"username": "", "password": "x"}))
        .await;
    assert_eq!(
        (blank_username.status, blank_username.body),
        (400, json!({"message": {"username": ["can't be blank"]}}))
    );
    let cleared = api
        .patch(&path, json!({"username": "", "password": ""}))
        .await;
    assert_eq!(cleared.status, 200);
    assert_eq!(state_upstream(&api, id).username, None);
    let lone_username = api.patch(&path, json!({"username": "bot"})).await;
    assert_eq!(
        (lone_username.status, lone_username.body),
        (400, json!({"message": {"password": ["can't be blank"]}}))
    );
}

#[tokio::test]
async fn existing_upstream_test_parameters_and_probed_path() {
    let (api, registry) = local_with_registry().await;
    let stub = UpstreamStub::start(StubBehaviour::requiring("bot", "pw"))
        .await
        .unwrap();
    let created = api
        .post(
            &format!("{VR}/registries/{registry}/upstreams"),
            json!({"name": "stub", "url": stub.url(), "username": "bot", "password": "pw"}),
        )
        .await;
    let id = upstream_id(&created);
    let test = format!("{VR}/upstreams/{id}/test");
    let ok = json!({"success": true});
    let unauthorized = json!({"success": false, "result": "Error: 401 - Unauthorized"});
    for (body, expected_status, expected) in [
        (json!({}), 200, ok.clone()),
        (json!({"url": stub.url()}), 200, ok.clone()),
        (json!({"username": "bot", "password": ""}), 200, ok.clone()),
        (
            json!({"username": "bot", "password": "pw"}),
            200,
            ok.clone(),
        ),
        (
            json!({"username": "bot", "password": "no"}),
            200,
            unauthorized.clone(),
        ),
        (
            json!({"username": "", "password": ""}),
            200,
            unauthorized.clone(),
        ),
        (
            json!({"username": "bot"}),
            400,
            json!({"message": {"password": ["can't be blank"]}}),
        ),
        (
            json!({"password": "pw"}),
            400,
            json!({"message": {"username": ["can't be blank"]}}),
        ),
    ] {
        let reply = api.post(&test, body.clone()).await;
        assert_eq!(
            (reply.status, reply.body),
            (expected_status, expected),
            "{body}"
        );
    }
    // Nothing cached: the new-upstream path; then the first cached entry's path.
    assert_eq!(
        stub.registry_requests().last().unwrap().path,
        "/v2/library/alpine/manifests/latest"
    );
    let now = jiff::Timestamp::now();
    api.sim
        .with_state(|state| {
            state.put_cache_entry(sim::state::CacheEntry::cached_at(
                100,
                id,
                "library/nginx/manifests/1.27",
                now,
            ))
        })
        .unwrap();
    let reply = api.post(&test, json!({})).await;
    assert_eq!(reply.body, ok);
    assert_eq!(
        stub.registry_requests().last().unwrap().path,
        "/v2/library/nginx/manifests/1.27"
    );
    let token = stub
        .requests()
        .into_iter()
        .rev()
        .find(|request| request.is_token_request())
        .unwrap();
    assert!(
        token
            .query
            .unwrap()
            .contains("scope=repository%3Alibrary%2Fnginx%3Apull")
    );
    // A new url without credentials is tested anonymously.
    let other = UpstreamStub::start(StubBehaviour::requiring("bot", "pw"))
        .await
        .unwrap();
    let moved = api.post(&test, json!({"url": other.url()})).await;
    assert_eq!(moved.body, unauthorized);
    assert!(
        other
            .requests()
            .iter()
            .all(|request| !request.is_token_request())
    );
}

#[tokio::test]
async fn new_upstream_test_runs_the_model_validations() {
    let (api, registry) = local_with_registry().await;
    let stub = UpstreamStub::start(StubBehaviour::default()).await.unwrap();
    api.post(
        &format!("{VR}/registries/{registry}/upstreams"),
        json!({"name": "stub", "url": stub.url(), "username": "bot", "password": "pw"}),
    )
    .await;
    let test = "/groups/my-org/-/virtual_registries/container/upstreams/test";
    let duplicate = api
        .post(
            test,
            json!({"url": stub.url(), "username": "bot", "password": "pw"}),
        )
        .await;
    assert_eq!(
        (duplicate.status, duplicate.body),
        (
            400,
            json!({"message": {"group": ["already has an upstream with the same credentials"]}})
        )
    );
    let tests_before = stub.tests();
    let other = api
        .post(
            test,
            json!({"url": stub.url(), "username": "bot", "password": "other"}),
        )
        .await;
    assert_eq!((other.status, other.body), (200, json!({"success": true})));
    assert_eq!(
        stub.tests(),
        tests_before + 1,
        "the duplicate was never probed"
    );
    let blank = api
        .post(
            test,
            json!({"url": stub.url(), "username": "", "password": "x"}),
        )
        .await;
    assert_eq!(
        (blank.status, blank.body),
        (400, json!({"message": {"username": ["can't be blank"]}}))
    );
}

#[tokio::test]
async fn cache_entries_newest_first_with_group_iid_ids() {
    let api = demo().await;
    let base = format!("{VR}/upstreams/400/cache_entries");
    let all = api.get(&base).await;
    let ids: Vec<String> = all
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| entry["id"].as_str().unwrap().to_owned())
        .collect();
    use base64::Engine as _;
    let decoded: Vec<String> = ids
        .iter()
        .map(|id| {
            String::from_utf8(
                base64::engine::general_purpose::URL_SAFE
                    .decode(id)
                    .unwrap(),
            )
            .unwrap()
        })
        .collect();
    assert_eq!(decoded, ["100 5", "100 4", "100 3", "100 2", "100 1"]);
    let searched = api
        .get(&format!("{base}?search=LIBRARY/Alpine/Manifests"))
        .await;
    assert_eq!(searched.body.as_array().unwrap().len(), 2);
    let malformed = api.delete(&format!("{VR}/cache_entries/not-base64!")).await;
    assert_eq!(
        (malformed.status, malformed.body),
        (400, json!({"error": "id is invalid"}))
    );
    let unknown = base64::engine::general_purpose::URL_SAFE.encode("100 99");
    assert_eq!(
        api.delete(&format!("{VR}/cache_entries/{unknown}"))
            .await
            .status,
        404
    );
    assert_eq!(
        api.delete(&format!("{VR}/cache_entries/{}", ids[0]))
            .await
            .status,
        204
    );
    assert_eq!(api.get(&base).await.header("x-total"), "4");
}

#[tokio::test]
async fn bulk_delete_concatenated_anchors_untimed_tags_and_late_older_than() {
    let yaml = "groups: [{id: 1, full_path: g}]\nprojects:\n  - id: 2\n    path_with_namespace: g/p\n    repositories:\n      - id: 3\n        tags:\n          - {name: v1, digest: 'sha256:1', created_at: '2025-01-01T00:00:00Z'}\n          - {name: v1-rc, digest: 'sha256:2', created_at: '2025-01-02T00:00:00Z'}\n          - {name: xv2, digest: 'sha256:3', created_at: '2025-01-03T00:00:00Z'}\n          - {name: av1, digest: 'sha256:4', created_at: '2025-01-04T00:00:00Z'}\n          - {name: v2, digest: 'sha256:5', created_at: '2025-01-05T00:00:00Z'}\n          - {name: v2-untimed, digest: 'sha256:6'}\n      - id: 4\n        tags:\n          - {name: old, digest: 'sha256:7', created_at: '2024-01-01T00:00:00Z'}\n";
    let api = start(config(), Seed::parse(yaml).unwrap()).await;
    api.sim
        .set_clock(Some("2025-02-01T00:00:00Z".parse().unwrap()));
    let remaining = |api: &Api, repository: u64| -> Vec<String> {
        api.sim
            .snapshot()
            .repositories
            .into_iter()
            .find(|r| r.id == repository)
            .unwrap()
            .tags
            .keys()
            .cloned()
            .collect()
    };
    // `\Av1|v2.*\z`: v1, v1-rc (`\Av1`) and xv2, v2 (`v2.*\z`) match, av1 does not; keep_n 1
    // spares the tag without a time (it counts as now, the newest) and nothing else.
    let reply = api
        .call(
            Method::DELETE,
            "/projects/2/registry/repositories/3/tags",
            Some(json!({"name_regex_delete": "v1|v2.*", "keep_n": 1})),
        )
        .await;
    assert_eq!(reply.status, 202, "{:?}", reply.body);
    assert_eq!(remaining(&api, 3), ["av1", "v2-untimed"]);
    // A bad older_than is accepted, deletes nothing, and takes the hourly lock.
    let late = api
        .call(
            Method::DELETE,
            "/projects/2/registry/repositories/4/tags",
            Some(json!({"name_regex_delete": ".*", "older_than": "whenever"})),
        )
        .await;
    assert_eq!((late.status, late.body), (202, json!(202)));
    assert_eq!(remaining(&api, 4), ["old"]);
    let again = api
        .call(
            Method::DELETE,
            "/projects/2/registry/repositories/4/tags",
            Some(json!({"name_regex_delete": ".*"})),
        )
        .await;
    assert_eq!(again.status, 400);
}

#[tokio::test]
async fn cleanup_policy_regexes_are_checked_only_when_enabled() {
    let api = demo().await;
    let put = |attributes: Value| {
        api.call(
            Method::PUT,
            "/projects/200",
            Some(json!({ "container_expiration_policy_attributes": attributes })),
        )
    };
    let disabled =
        put(json!({"enabled": false, "name_regex": "(unclosed", "name_regex_keep": "[x"})).await;
    assert_eq!(disabled.status, 200, "{:?}", disabled.body);
    assert_eq!(
        disabled.body["container_expiration_policy"]["name_regex"],
        json!("(unclosed")
    );
    let enabled = put(json!({"enabled": true})).await;
    assert_eq!(enabled.status, 400);
    let errors = enabled.body["message"].as_object().unwrap();
    for field in [
        "container_expiration_policy.name_regex",
        "container_expiration_policy.name_regex_keep",
    ] {
        let message = errors[field][0].as_str().unwrap();
        assert!(message.starts_with("not valid RE2 syntax: "), "{message}");
    }
}

#[tokio::test]
async fn tag_delete_from_developer_and_protection_as_plain_403() {
    let developer = start(
        SimConfig {
            role: sim::AccessLevel::Developer,
            ..config()
        },
        Seed::demo(),
    )
    .await;
    let tags = "/projects/200/registry/repositories/300/tags";
    assert_eq!(developer.delete(&format!("{tags}/1.3.0")).await.status, 200);
    let protected = developer.delete(&format!("{tags}/1.2.0")).await;
    assert_eq!(
        (protected.status, protected.body),
        (403, json!({"message": "403 Forbidden"}))
    );
    let rules = developer
        .get("/projects/200/registry/protection/tag/rules")
        .await;
    assert_eq!(
        (rules.status, rules.body),
        (403, json!({"message": "403 Forbidden"}))
    );
    let reporter = start(
        SimConfig {
            role: sim::AccessLevel::Reporter,
            ..config()
        },
        Seed::demo(),
    )
    .await;
    let refused = reporter.delete(&format!("{tags}/1.3.0")).await;
    assert_eq!(
        (refused.status, refused.body),
        (403, json!({"message": "403 Forbidden"}))
    );
    // Bulk delete stays Maintainer's.
    assert_eq!(
        developer
            .call(
                Method::DELETE,
                tags,
                Some(json!({"name_regex_delete": ".*"}))
            )
            .await
            .status,
        403
    );
}
