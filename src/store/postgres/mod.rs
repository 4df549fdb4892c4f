//! PostgreSQL as the store's second backend (in progress: the schema and the pool).

#[cfg(test)]
pub(crate) mod test_cluster;

/// A fresh database in this test process's throwaway cluster, or `None` after
/// skipping `test` by the rule of `test_skip` when PostgreSQL is not installed.
#[cfg(test)]
pub(crate) fn test_database(test: &str) -> Option<test_cluster::TestDatabase> {
    match test_cluster::cluster() {
        Ok(cluster) => Some(cluster.create_database()),
        Err(reason) => {
            crate::test_skip::skip(test, &reason);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_test_cluster_gives_each_test_its_own_database_behind_a_password() {
        let Some(first) = test_database("the_test_cluster_gives_each_test_its_own_database_behind_a_password") else {
            return;
        };
        let second = test_cluster::cluster().unwrap().create_database();
        assert_ne!(first.name, second.name);
        let (client, connection) = tokio_postgres::connect(&first.url(), tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        let who: String = client.query_one("SELECT current_user::text", &[]).await.unwrap().get(0);
        assert_eq!(who, test_cluster::PASSWORD_ROLE);
        let wrong = tokio_postgres::connect(&first.url_with_password("nope"), tokio_postgres::NoTls).await;
        assert!(wrong.is_err());
    }
}
