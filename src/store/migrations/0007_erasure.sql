-- Erasure (`DELETE /v1/persons/{id}`, docs/design.md §6): the ids of erased persons, and
-- nothing else about them. Every process reads this table (at start, at each partition's
-- restore, and every few seconds) and drops what the Kafka topics still hold of these persons,
-- so that a replay does not bring them back. Their `person`, `location`, `halo_copy` and
-- `connection` rows are deleted; from now on persons can be deleted (migration 0003 assumed
-- they never were: the episode writer and the location writer both skip the rows of persons
-- that do not exist).
CREATE TABLE erased_person (
    person_id bigint PRIMARY KEY,
    erased_at timestamptz NOT NULL DEFAULT now()
);
