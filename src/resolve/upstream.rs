//! The rules that turn an Upstream and the registries listing it into the engine's choices.

use kube::ResourceExt;

use super::facts::GitLabId;
use super::world::World;
use crate::crd::Upstream;
use crate::sync::upstream::CreateThrough;

/// A registry that lists the Upstream and has a GitLab id, or is on its way to one.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct ListingRegistry {
    name: String,
    /// The Upstream's position in the registry's list.
    position: usize,
    id: Option<i64>,
}

/// The registry an Upstream is created through, chosen among the registries of its
/// namespace and group that list it and are not leaving, including those still on their way
/// to an id (so the choice does not depend on which registry got its id first): one that
/// lists it first, since the create puts it at position 1 where it belongs; else the
/// Upstreams are spread over the registries by their position in the first registry by name,
/// so creates go to different registries and run at once (GitLab takes one insert at a time
/// per registry), each registry moving at most its one created member into place afterwards.
/// `None` while the chosen registry has no id yet and no plan creates it: the Upstream waits
/// for it (its id triggers the next reconcile). The same for every reconcile while the
/// registries do not change, and the same for the operator and standalone.
pub fn create_through(upstream: &Upstream, world: &impl World) -> Option<CreateThrough> {
    let namespace = upstream.namespace();
    let name = upstream.name_any();
    let mut listing: Vec<ListingRegistry> = world
        .registries()
        .into_iter()
        .filter(|registry| {
            registry.namespace == namespace
                && !registry.leaving
                && registry.group == upstream.spec.group
        })
        .filter_map(|registry| {
            let id = match registry.id {
                GitLabId::Held(id) => Some(id),
                GitLabId::OnItsWay => None,
                GitLabId::Blocked => return None,
            };
            Some(ListingRegistry {
                position: registry.position_of(&name)?,
                name: registry.name,
                id,
            })
        })
        .collect();
    let chosen = registry_to_create_through(&mut listing)?;
    match chosen.id {
        Some(id) => Some(CreateThrough::Registry(id)),
        None if world.plans_creations() => {
            Some(CreateThrough::RegistryThisPlanCreates(chosen.name.clone()))
        }
        None => None,
    }
}

fn registry_to_create_through(listing: &mut [ListingRegistry]) -> Option<&ListingRegistry> {
    listing.sort_unstable();
    if let Some(first) = listing.iter().position(|registry| registry.position == 0) {
        return listing.get(first);
    }
    let position_in_first = listing.first()?.position;
    listing.get(position_in_first % listing.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listing(name: &str, position: usize, id: Option<i64>) -> ListingRegistry {
        ListingRegistry {
            name: name.into(),
            position,
            id,
        }
    }

    fn through(mut listing: Vec<ListingRegistry>) -> Option<i64> {
        registry_to_create_through(&mut listing).and_then(|chosen| chosen.id)
    }

    #[test]
    fn creates_go_through_a_registry_listing_the_upstream_first_else_spread_by_position() {
        let first = vec![listing("a", 1, Some(5)), listing("b", 0, Some(6))];
        assert_eq!(through(first), Some(6));
        // Listed third everywhere: the third of the registries by name.
        let third = vec![
            listing("c", 2, Some(1)),
            listing("a", 2, Some(3)),
            listing("b", 2, Some(2)),
        ];
        assert_eq!(through(third), Some(1));
        // Five registries listing the same five Upstreams: one create into each, the same
        // whether or not the others have their ids yet.
        let names = ["r0", "r1", "r2", "r3", "r4"];
        let spread: Vec<_> = (0..5)
            .map(|position| {
                through(
                    names
                        .iter()
                        .zip(10..)
                        .map(|(name, id)| listing(name, position, Some(id)))
                        .collect(),
                )
            })
            .collect();
        assert_eq!(spread, [Some(10), Some(11), Some(12), Some(13), Some(14)]);
        let only_r1_has_an_id = |position| {
            through(
                names
                    .iter()
                    .map(|name| listing(name, position, (*name == "r1").then_some(11)))
                    .collect(),
            )
        };
        assert_eq!(only_r1_has_an_id(1), Some(11));
        assert_eq!(only_r1_has_an_id(3), None, "waits for r3");
        assert_eq!(through(Vec::new()), None);
    }
}
