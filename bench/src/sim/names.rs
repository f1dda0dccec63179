//! Deterministic fake attendees: names and companies that depend only on the person's id, so
//! every simulation run and every seed agree on who person 42 is.

use udaconnect_actors::domain::{Person, PersonId};

use super::rng::SplitMix64;

const FIRST_NAMES: &[&str] = &[
    "Ada",
    "Aiko",
    "Alejandro",
    "Amara",
    "Anika",
    "Arjun",
    "Astrid",
    "Beatriz",
    "Bilal",
    "Camille",
    "Carlos",
    "Chen",
    "Chiara",
    "Dario",
    "Dmitri",
    "Elena",
    "Emeka",
    "Esther",
    "Farah",
    "Felix",
    "Freya",
    "Giulia",
    "Hana",
    "Hugo",
    "Ibrahim",
    "Ines",
    "Ivan",
    "Jamal",
    "Jana",
    "Jasper",
    "Kai",
    "Kenji",
    "Lars",
    "Leila",
    "Lucia",
    "Malik",
    "Maren",
    "Mateo",
    "Maya",
    "Mei",
    "Nadia",
    "Niko",
    "Nora",
    "Olga",
    "Omar",
    "Priya",
    "Rafael",
    "Rosa",
    "Sami",
    "Sofia",
    "Tariq",
    "Theo",
    "Valentina",
    "Wei",
    "Yara",
    "Yusuf",
    "Zanele",
    "Zoe",
];

const LAST_NAMES: &[&str] = &[
    "Abara", "Andersen", "Bauer", "Becker", "Chandra", "Costa", "Dubois", "Eriksson", "Fischer",
    "Fonseca", "Garcia", "Haddad", "Hansen", "Ito", "Jansen", "Kowalski", "Kumar", "Larsen",
    "Lopez", "Mensah", "Moreau", "Nakamura", "Novak", "Okafor", "Oliveira", "Park", "Petrov",
    "Quinn", "Rossi", "Sato", "Schmidt", "Silva", "Singh", "Sorensen", "Tanaka", "Torres", "Usman",
    "Varga", "Wagner", "Wang", "Yilmaz", "Zhang",
];

const COMPANY_PREFIXES: &[&str] = &[
    "Acme",
    "Blue Mesa",
    "Cobalt",
    "Desert Rose",
    "Ember",
    "Foothill",
    "Granite",
    "Helix",
    "Juniper",
    "Kestrel",
    "Lumen",
    "Mesa Verde",
    "Northwind",
    "Orbital",
    "Piñon",
    "Quasar",
    "Redline",
    "Sandia",
    "Turquoise",
    "Vector",
];

const COMPANY_SUFFIXES: &[&str] = &[
    "Analytics",
    "Robotics",
    "Logistics",
    "Health",
    "Labs",
    "Systems",
    "Networks",
    "Energy",
    "Software",
    "Consulting",
];

/// The fake attendee with id `id`: the same for every seed and every run.
pub fn person(id: PersonId) -> Person {
    let mut sm = SplitMix64::new(0x005E_ED0F_A77E_4DEE ^ id as u64);
    let mut pick = |list: &[&'static str]| list[(sm.next_u64() % list.len() as u64) as usize];
    let first_name = pick(FIRST_NAMES).to_owned();
    let last_name = pick(LAST_NAMES).to_owned();
    let company_name = format!("{} {}", pick(COMPANY_PREFIXES), pick(COMPANY_SUFFIXES));
    Person {
        id,
        first_name,
        last_name,
        company_name,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_depend_only_on_the_id_and_vary() {
        assert_eq!(person(42), person(42));
        let names: std::collections::HashSet<String> = (1..=1_000)
            .map(|id| {
                let p = person(id);
                assert_eq!(p.id, id);
                format!("{} {}", p.first_name, p.last_name)
            })
            .collect();
        // 58 × 42 combinations: a thousand people should mostly have distinct names.
        assert!(names.len() > 700, "{}", names.len());
    }
}
