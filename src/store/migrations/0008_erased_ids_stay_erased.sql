-- An erased person's id never names a person again (docs/design.md §6): an INSERT of a
-- `person` row with an id in `erased_person` is skipped, whatever inserts it (the POC seed
-- loaded again, a simulator's attendees, a client choosing ids). One rule for every writer, in
-- the one place they all go through.
CREATE FUNCTION person_skip_erased() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM erased_person WHERE person_id = NEW.id) THEN
        RETURN NULL;
    END IF;
    RETURN NEW;
END;
$$;
CREATE TRIGGER person_not_erased BEFORE INSERT ON person
    FOR EACH ROW EXECUTE FUNCTION person_skip_erased();
