// Copyright 2020 Contributors to the Parsec project.
// SPDX-License-Identifier: Apache-2.0
pub mod agile;
