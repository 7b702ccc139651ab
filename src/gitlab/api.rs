//! The typed endpoint methods of [`GitLabClient`], one per documented GitLab endpoint.

use reqwest::Method;
use serde_json::json;
use url::Url;

use super::GitLabClient;
use super::error::Result;
use super::model::*;
use super::path::{GroupRef, ProjectRef, encode_cache_entry_id, encode_segment};
use super::transport::{Call, MAX_PER_PAGE, RequestBody, Transport};

const VR: &str = "/virtual_registries/container";

fn paged(call: Call, page: PageRequest) -> Call {
    call.query_opt("page", page.page)
        .query_opt("per_page", page.per_page)
}

fn all_pages_of(call: Call, page: u32) -> Call {
    call.query("page", page).query("per_page", MAX_PER_PAGE)
}

/// Virtual registries.
impl GitLabClient {
    /// `GET /groups/:id/-/virtual_registries/container/registries` (not paginated).
    pub async fn list_registries(&self, group: &GroupRef) -> Result<Vec<VirtualRegistry>> {
        let path = format!("/groups/{}/-{VR}/registries", group.to_path_segment());
        self.inner
            .json(Call::new(
                Method::GET,
                "/groups/:id/-/virtual_registries/container/registries",
                path,
            ))
            .await
    }

    /// `POST /groups/:id/-/virtual_registries/container/registries`.
    pub async fn create_registry(
        &self,
        group: &GroupRef,
        name: &str,
        description: Option<&str>,
    ) -> Result<VirtualRegistry> {
        let path = format!("/groups/{}/-{VR}/registries", group.to_path_segment());
        let mut body = json!({ "name": name });
        if let Some(description) = description {
            body["description"] = json!(description);
        }
        self.inner
            .json(
                Call::new(
                    Method::POST,
                    "/groups/:id/-/virtual_registries/container/registries",
                    path,
                )
                .body(RequestBody::json(&body)?),
            )
            .await
    }

    /// `GET /virtual_registries/container/registries/:id`, with `registry_upstreams`.
    pub async fn get_registry(&self, registry_id: i64) -> Result<VirtualRegistry> {
        self.inner
            .json(Call::new(
                Method::GET,
                "/virtual_registries/container/registries/:id",
                format!("{VR}/registries/{registry_id}"),
            ))
            .await
    }

    /// `PATCH /virtual_registries/container/registries/:id` (GitLab needs name or description).
    pub async fn update_registry(&self, registry_id: i64, update: &RegistryUpdate) -> Result<()> {
        self.inner
            .empty(
                Call::new(
                    Method::PATCH,
                    "/virtual_registries/container/registries/:id",
                    format!("{VR}/registries/{registry_id}"),
                )
                .body(RequestBody::json(update)?),
            )
            .await
    }

    /// `DELETE /virtual_registries/container/registries/:id`; GitLab also deletes upstreams
    /// associated with no other registry.
    pub async fn delete_registry(&self, registry_id: i64) -> Result<()> {
        self.inner
            .empty(Call::new(
                Method::DELETE,
                "/virtual_registries/container/registries/:id",
                format!("{VR}/registries/{registry_id}"),
            ))
            .await
    }

    /// `DELETE /virtual_registries/container/registries/:id/cache`: schedules deletion of the
    /// cache of the registry's exclusive upstreams.
    pub async fn purge_registry_cache(&self, registry_id: i64) -> Result<()> {
        self.inner
            .empty(Call::new(
                Method::DELETE,
                "/virtual_registries/container/registries/:id/cache",
                format!("{VR}/registries/{registry_id}/cache"),
            ))
            .await
    }
}

/// Upstreams.
impl GitLabClient {
    fn group_upstreams_call(group: &GroupRef, upstream_name: Option<&str>) -> Call {
        Call::new(
            Method::GET,
            "/groups/:id/-/virtual_registries/container/upstreams",
            format!("/groups/{}/-{VR}/upstreams", group.to_path_segment()),
        )
        .query_opt("upstream_name", upstream_name)
    }

    /// `GET /groups/:id/-/virtual_registries/container/upstreams`, one page; `upstream_name`
    /// is GitLab's fuzzy name filter.
    pub async fn list_group_upstreams(
        &self,
        group: &GroupRef,
        page: PageRequest,
        upstream_name: Option<&str>,
    ) -> Result<Page<Upstream>> {
        self.inner
            .page(paged(
                Self::group_upstreams_call(group, upstream_name),
                page,
            ))
            .await
    }

    /// Every upstream of the group (all pages).
    pub async fn list_group_upstreams_all(
        &self,
        group: &GroupRef,
        upstream_name: Option<&str>,
    ) -> Result<Vec<Upstream>> {
        self.inner
            .all_pages(|page| all_pages_of(Self::group_upstreams_call(group, upstream_name), page))
            .await
    }

    /// `POST /virtual_registries/container/registries/:id/upstreams`: creates an upstream
    /// associated with the registry (the answer carries `registry_upstream`).
    pub async fn create_upstream(
        &self,
        registry_id: i64,
        upstream: &NewUpstream,
    ) -> Result<Upstream> {
        self.inner
            .json(
                Call::new(
                    Method::POST,
                    "/virtual_registries/container/registries/:id/upstreams",
                    format!("{VR}/registries/{registry_id}/upstreams"),
                )
                .body(RequestBody::json(&upstream.to_body())?),
            )
            .await
    }

    /// `GET /virtual_registries/container/registries/:id/upstreams` (not paginated), each with
    /// its `registry_upstream` (association id and position).
    pub async fn list_registry_upstreams(&self, registry_id: i64) -> Result<Vec<Upstream>> {
        self.inner
            .json(Call::new(
                Method::GET,
                "/virtual_registries/container/registries/:id/upstreams",
                format!("{VR}/registries/{registry_id}/upstreams"),
            ))
            .await
    }

    /// `GET /virtual_registries/container/upstreams/:id`, with `registry_upstreams`.
    pub async fn get_upstream(&self, upstream_id: i64) -> Result<Upstream> {
        self.inner
            .json(Call::new(
                Method::GET,
                "/virtual_registries/container/upstreams/:id",
                format!("{VR}/upstreams/{upstream_id}"),
            ))
            .await
    }

    /// `PATCH /virtual_registries/container/upstreams/:id`. A url change clears the stored
    /// credentials unless both username and password change in the same request: send the
    /// credentials in a second call after a url change.
    pub async fn update_upstream(&self, upstream_id: i64, update: &UpstreamUpdate) -> Result<()> {
        self.inner
            .empty(
                Call::new(
                    Method::PATCH,
                    "/virtual_registries/container/upstreams/:id",
                    format!("{VR}/upstreams/{upstream_id}"),
                )
                .body(RequestBody::json(&update.to_body())?),
            )
            .await
    }

    /// `DELETE /virtual_registries/container/upstreams/:id`.
    pub async fn delete_upstream(&self, upstream_id: i64) -> Result<()> {
        self.inner
            .empty(Call::new(
                Method::DELETE,
                "/virtual_registries/container/upstreams/:id",
                format!("{VR}/upstreams/{upstream_id}"),
            ))
            .await
    }

    /// `DELETE /virtual_registries/container/upstreams/:id/cache`.
    pub async fn purge_upstream_cache(&self, upstream_id: i64) -> Result<()> {
        self.inner
            .empty(Call::new(
                Method::DELETE,
                "/virtual_registries/container/upstreams/:id/cache",
                format!("{VR}/upstreams/{upstream_id}/cache"),
            ))
            .await
    }

    /// `POST /groups/:id/-/virtual_registries/container/upstreams/test`: tests a connection
    /// before the upstream exists. A failed test is `Ok` with `success: false`. GitLab first
    /// runs the model validations of an unsaved upstream: the url and credentials of an
    /// existing upstream of the group answer
    /// `400 {"message":{"group":["already has an upstream with the same credentials"]}}`.
    pub async fn test_upstream_connection(
        &self,
        group: &GroupRef,
        url: &str,
        credentials: Option<&UpstreamCredentials>,
    ) -> Result<UpstreamTestResult> {
        let path = format!("/groups/{}/-{VR}/upstreams/test", group.to_path_segment());
        self.inner
            .json(
                Call::new(
                    Method::POST,
                    "/groups/:id/-/virtual_registries/container/upstreams/test",
                    path,
                )
                .body(RequestBody::json(&connection_test_body(url, credentials))?),
            )
            .await
    }

    /// `POST /virtual_registries/container/upstreams/:id/test`, optionally with a new url
    /// and/or credentials to try before updating. No overrides (or the stored url) test the
    /// stored credentials; a new url alone is tested anonymously; a username or password alone
    /// is GitLab's `400` "can't be blank". GitLab probes the first cached path.
    pub async fn test_existing_upstream(
        &self,
        upstream_id: i64,
        overrides: &UpstreamTestOverrides,
    ) -> Result<UpstreamTestResult> {
        self.inner
            .json(
                Call::new(
                    Method::POST,
                    "/virtual_registries/container/upstreams/:id/test",
                    format!("{VR}/upstreams/{upstream_id}/test"),
                )
                .body(RequestBody::json(&overrides.to_body())?),
            )
            .await
    }
}

/// Registry–upstream associations.
impl GitLabClient {
    /// `POST /virtual_registries/container/registry_upstreams`: the new association gets the
    /// next free position.
    pub async fn associate_upstream(
        &self,
        registry_id: i64,
        upstream_id: i64,
    ) -> Result<RegistryUpstream> {
        self.inner
            .json(
                Call::new(
                    Method::POST,
                    "/virtual_registries/container/registry_upstreams",
                    format!("{VR}/registry_upstreams"),
                )
                .body(RequestBody::json(
                    &json!({ "registry_id": registry_id, "upstream_id": upstream_id }),
                )?),
            )
            .await
    }

    /// `PATCH /virtual_registries/container/registry_upstreams/:id`. GitLab accepts 1..=20
    /// but moves only for 1..=5 (capped at the highest position, shifting those in between);
    /// 6..=20 answers 200 and moves nothing.
    pub async fn reposition_association(&self, association_id: i64, position: i64) -> Result<()> {
        self.inner
            .empty(
                Call::new(
                    Method::PATCH,
                    "/virtual_registries/container/registry_upstreams/:id",
                    format!("{VR}/registry_upstreams/{association_id}"),
                )
                .body(RequestBody::json(&json!({ "position": position }))?),
            )
            .await
    }

    /// `DELETE /virtual_registries/container/registry_upstreams/:id`: the upstream survives.
    pub async fn delete_association(&self, association_id: i64) -> Result<()> {
        self.inner
            .empty(Call::new(
                Method::DELETE,
                "/virtual_registries/container/registry_upstreams/:id",
                format!("{VR}/registry_upstreams/{association_id}"),
            ))
            .await
    }
}

/// Upstream cache entries.
impl GitLabClient {
    fn cache_entries_call(upstream_id: i64, search: Option<&str>) -> Call {
        Call::new(
            Method::GET,
            "/virtual_registries/container/upstreams/:id/cache_entries",
            format!("{VR}/upstreams/{upstream_id}/cache_entries"),
        )
        .query_opt("search", search)
    }

    /// `GET /virtual_registries/container/upstreams/:id/cache_entries`, one page, newest
    /// first; `search` is a case-insensitive substring of the relative path.
    pub async fn list_cache_entries(
        &self,
        upstream_id: i64,
        page: PageRequest,
        search: Option<&str>,
    ) -> Result<Page<CacheEntry>> {
        self.inner
            .page(paged(Self::cache_entries_call(upstream_id, search), page))
            .await
    }

    /// Every cache entry of the upstream (all pages).
    pub async fn list_cache_entries_all(
        &self,
        upstream_id: i64,
        search: Option<&str>,
    ) -> Result<Vec<CacheEntry>> {
        self.inner
            .all_pages(|page| all_pages_of(Self::cache_entries_call(upstream_id, search), page))
            .await
    }

    /// `DELETE /virtual_registries/container/cache_entries/*id`.
    pub async fn delete_cache_entry(&self, cache_entry_id: &str) -> Result<()> {
        self.inner
            .empty(Call::new(
                Method::DELETE,
                "/virtual_registries/container/cache_entries/*id",
                format!(
                    "{VR}/cache_entries/{}",
                    encode_cache_entry_id(cache_entry_id)
                ),
            ))
            .await
    }
}

/// Container repositories and tags.
impl GitLabClient {
    fn project_repositories_call(project: &ProjectRef, request: &RepositoryListRequest) -> Call {
        Call::new(
            Method::GET,
            "/projects/:id/registry/repositories",
            format!(
                "/projects/{}/registry/repositories",
                project.to_path_segment()
            ),
        )
        .query_opt("tags", request.tags.then_some(true))
        .query_opt("tags_count", request.tags_count.then_some(true))
    }

    /// `GET /projects/:id/registry/repositories`, one page.
    pub async fn list_project_repositories(
        &self,
        project: &ProjectRef,
        request: &RepositoryListRequest,
    ) -> Result<Page<ContainerRepository>> {
        self.inner
            .page(paged(
                Self::project_repositories_call(project, request),
                request.page,
            ))
            .await
    }

    /// Every container repository of the project (all pages).
    pub async fn list_project_repositories_all(
        &self,
        project: &ProjectRef,
        request: &RepositoryListRequest,
    ) -> Result<Vec<ContainerRepository>> {
        self.inner
            .all_pages(|page| all_pages_of(Self::project_repositories_call(project, request), page))
            .await
    }

    fn group_repositories_call(group: &GroupRef) -> Call {
        Call::new(
            Method::GET,
            "/groups/:id/registry/repositories",
            format!("/groups/{}/registry/repositories", group.to_path_segment()),
        )
    }

    /// `GET /groups/:id/registry/repositories`, one page (every project of the group).
    pub async fn list_group_repositories(
        &self,
        group: &GroupRef,
        page: PageRequest,
    ) -> Result<Page<ContainerRepository>> {
        self.inner
            .page(paged(Self::group_repositories_call(group), page))
            .await
    }

    /// Every container repository of the group's projects (all pages).
    pub async fn list_group_repositories_all(
        &self,
        group: &GroupRef,
    ) -> Result<Vec<ContainerRepository>> {
        self.inner
            .all_pages(|page| all_pages_of(Self::group_repositories_call(group), page))
            .await
    }

    /// `GET /registry/repositories/:id`.
    pub async fn get_repository(
        &self,
        repository_id: i64,
        request: &RepositoryDetailsRequest,
    ) -> Result<ContainerRepository> {
        self.inner
            .json(
                Call::new(
                    Method::GET,
                    "/registry/repositories/:id",
                    format!("/registry/repositories/{repository_id}"),
                )
                .query_opt("tags", request.tags.then_some(true))
                .query_opt("tags_count", request.tags_count.then_some(true))
                .query_opt("size", request.size.then_some(true)),
            )
            .await
    }

    fn tags_call(project: &ProjectRef, repository_id: i64) -> Call {
        Call::new(
            Method::GET,
            "/projects/:id/registry/repositories/:repository_id/tags",
            tags_path(project, repository_id),
        )
    }

    /// `GET /projects/:id/registry/repositories/:repository_id/tags`, one page (offset
    /// pagination, deprecated by GitLab in favour of keyset).
    pub async fn list_tags(
        &self,
        project: &ProjectRef,
        repository_id: i64,
        page: PageRequest,
    ) -> Result<Page<Tag>> {
        self.inner
            .page(paged(Self::tags_call(project, repository_id), page))
            .await
    }

    /// Every tag of the repository, by offset pagination.
    pub async fn list_tags_all(
        &self,
        project: &ProjectRef,
        repository_id: i64,
    ) -> Result<Vec<Tag>> {
        self.inner
            .all_pages(|page| all_pages_of(Self::tags_call(project, repository_id), page))
            .await
    }

    /// First page of keyset pagination (`pagination=keyset`); `next` is GitLab's
    /// `Link: rel="next"` for [`Self::list_tags_keyset_next`].
    pub async fn list_tags_keyset(
        &self,
        project: &ProjectRef,
        repository_id: i64,
        request: &KeysetRequest,
    ) -> Result<KeysetPage<Tag>> {
        let call = Self::tags_call(project, repository_id)
            .query("pagination", "keyset")
            .query_opt("per_page", request.per_page)
            .query_opt("sort", request.sort.map(SortOrder::as_str))
            .query_opt("last", request.last.as_deref());
        self.inner.keyset_page(call).await
    }

    /// The page behind a keyset `next` link (only links into the configured GitLab's API are
    /// followed, so the token never goes elsewhere).
    pub async fn list_tags_keyset_next(&self, next: &Url) -> Result<KeysetPage<Tag>> {
        self.inner
            .keyset_page(Transport::link_call(
                "/projects/:id/registry/repositories/:repository_id/tags",
                next.clone(),
            ))
            .await
    }

    /// Every tag of the repository by keyset pagination, following `Link: rel="next"`.
    pub async fn list_tags_keyset_all(
        &self,
        project: &ProjectRef,
        repository_id: i64,
        sort: SortOrder,
    ) -> Result<Vec<Tag>> {
        let request = KeysetRequest {
            per_page: Some(MAX_PER_PAGE),
            sort: Some(sort),
            last: None,
        };
        let mut page = self
            .list_tags_keyset(project, repository_id, &request)
            .await?;
        let mut tags = Vec::new();
        let mut visited = std::collections::HashSet::new();
        loop {
            let received = page.items.len();
            tags.append(&mut page.items);
            match page.next.take() {
                Some(next) if received > 0 && visited.insert(next.to_string()) => {
                    page = self.list_tags_keyset_next(&next).await?;
                }
                _ => break,
            }
        }
        Ok(tags)
    }

    /// `GET /projects/:id/registry/repositories/:repository_id/tags/:tag_name`.
    pub async fn get_tag(
        &self,
        project: &ProjectRef,
        repository_id: i64,
        tag_name: &str,
    ) -> Result<TagDetails> {
        self.inner
            .json(Call::new(
                Method::GET,
                "/projects/:id/registry/repositories/:repository_id/tags/:tag_name",
                format!(
                    "{}/{}",
                    tags_path(project, repository_id),
                    encode_segment(tag_name)
                ),
            ))
            .await
    }

    /// `DELETE /projects/:id/registry/repositories/:repository_id/tags/:tag_name` (Developer or
    /// higher). A tag a protection rule covers, immutable rules included, is refused by policy
    /// with a plain `403 {"message":"403 Forbidden"}` ([`super::Error::Forbidden`]).
    pub async fn delete_tag(
        &self,
        project: &ProjectRef,
        repository_id: i64,
        tag_name: &str,
    ) -> Result<()> {
        self.inner
            .empty(Call::new(
                Method::DELETE,
                "/projects/:id/registry/repositories/:repository_id/tags/:tag_name",
                format!(
                    "{}/{}",
                    tags_path(project, repository_id),
                    encode_segment(tag_name)
                ),
            ))
            .await
    }

    /// `DELETE /projects/:id/registry/repositories/:repository_id/tags` (202; GitLab deletes
    /// asynchronously, at most once an hour per repository).
    pub async fn bulk_delete_tags(
        &self,
        project: &ProjectRef,
        repository_id: i64,
        criteria: &BulkTagDelete,
    ) -> Result<()> {
        self.inner
            .empty(
                Call::new(
                    Method::DELETE,
                    "/projects/:id/registry/repositories/:repository_id/tags",
                    tags_path(project, repository_id),
                )
                .body(RequestBody::form(&criteria.to_params())),
            )
            .await
    }

    /// `GET /projects/:id/registry/protection/tag/rules`. Needs Maintainer (`403` below) and
    /// lists mutable rules only: an empty list does not mean that no tag is protected.
    pub async fn list_tag_protection_rules(
        &self,
        project: &ProjectRef,
    ) -> Result<Vec<TagProtectionRule>> {
        self.inner
            .json(Call::new(
                Method::GET,
                "/projects/:id/registry/protection/tag/rules",
                format!(
                    "/projects/{}/registry/protection/tag/rules",
                    project.to_path_segment()
                ),
            ))
            .await
    }
}

/// Projects and their GitLab-run cleanup policy.
impl GitLabClient {
    /// Every branch of the project's repository (`GET /projects/:id/repository/branches`,
    /// all pages).
    pub async fn list_branches_all(&self, project: &ProjectRef) -> Result<Vec<Branch>> {
        self.inner
            .all_pages(|page| {
                all_pages_of(
                    Call::new(
                        Method::GET,
                        "/projects/:id/repository/branches",
                        format!(
                            "/projects/{}/repository/branches",
                            project.to_path_segment()
                        ),
                    ),
                    page,
                )
            })
            .await
    }

    fn group_projects_call(group: &GroupRef) -> Call {
        // `with_shared=false`: projects of other groups shared with this one are not its own.
        Call::new(
            Method::GET,
            "/groups/:id/projects",
            format!("/groups/{}/projects", group.to_path_segment()),
        )
        .query("include_subgroups", true)
        .query("with_shared", false)
    }

    /// `GET /groups/:id/projects?include_subgroups=true&with_shared=false`, every page: the
    /// projects of the group and of its subgroups. INFERRED from GitLab's Groups API
    /// documentation (not among the shared API pages).
    pub async fn list_group_projects_all(&self, group: &GroupRef) -> Result<Vec<Project>> {
        self.inner
            .all_pages(|page| all_pages_of(Self::group_projects_call(group), page))
            .await
    }

    /// `GET /projects/:id`.
    pub async fn get_project(&self, project: &ProjectRef) -> Result<Project> {
        self.inner
            .json(Call::new(
                Method::GET,
                "/projects/:id",
                format!("/projects/{}", project.to_path_segment()),
            ))
            .await
    }

    /// The project's `container_expiration_policy` (`None` when GitLab has none for it).
    pub async fn get_cleanup_policy(
        &self,
        project: &ProjectRef,
    ) -> Result<Option<ContainerExpirationPolicy>> {
        Ok(self.get_project(project).await?.container_expiration_policy)
    }

    /// `PUT /projects/:id` with `container_expiration_policy_attributes`; returns the policy
    /// as GitLab stored it (with `next_run_at`).
    pub async fn update_cleanup_policy(
        &self,
        project: &ProjectRef,
        update: &ContainerExpirationPolicyUpdate,
    ) -> Result<Option<ContainerExpirationPolicy>> {
        let project: Project = self
            .inner
            .json(
                Call::new(
                    Method::PUT,
                    "/projects/:id",
                    format!("/projects/{}", project.to_path_segment()),
                )
                .body(RequestBody::json(
                    &json!({ "container_expiration_policy_attributes": update }),
                )?),
            )
            .await?;
        Ok(project.container_expiration_policy)
    }
}

fn tags_path(project: &ProjectRef, repository_id: i64) -> String {
    format!(
        "/projects/{}/registry/repositories/{repository_id}/tags",
        project.to_path_segment()
    )
}
